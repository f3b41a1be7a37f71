"""What goes into the wheel, beyond pyproject.toml: every package under xentlit/ (found, so a new subpackage needs no
list), and the top-level conf/ as the package data xentlit/conf.

conf/ stays at the top of the repository, where scripts/*.py and an editable install read it;
xentlit.entry.package_config_dir finds either place. tests/test_install.py checks that the wheel holds every module
and config file.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["xentlit", "xentlit.*"]), "xentlit.conf"],
    package_dir={"xentlit.conf": "conf"},
    package_data={"xentlit.conf": ["*.yaml", "**/*.yaml"]},
)
