"""A plain install: the wheel built from the project's files, installed into a fresh virtual environment, runs
``xentlit train``, ``xentlit eval`` and ``xentlit predict`` from an empty directory, with no source tree in sight.

Offline and quick: the wheel is built without isolation (the running environment's setuptools), installed with
``--no-deps``, and the fresh environment sees the running one's dependencies through a ``.pth`` file (added after
the install, so pip does not take the running environment's own xentlit for this one).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, run_dirs

pytestmark = pytest.mark.slow

_PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "xentlit", "conf")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} exited {result.returncode}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``(venv, env)``: a fresh venv holding only the wheel, and an environment without the source tree."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    for name in _PROJECT_FILES:  # a copy: building in place would leave build/ and *.egg-info in the clone
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "XENTLIT_CONFIG_DIR")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(work / "dist"), str(source)], cwd=work, env=env)
    [wheel] = (work / "dist").glob("xentlit-*.whl")
    _assert_wheel_holds_the_package_and_its_configs(wheel)

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work, env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=work, env=env)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=work, env=env).stdout.strip()
    dependencies = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_xentlit_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    shutil.rmtree(source)  # no source tree left to fall back on
    return venv, env


def _assert_wheel_holds_the_package_and_its_configs(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "xentlit").rglob("*.py")}
    configs = {"xentlit/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert modules <= names, f"modules missing from the wheel (see setup.py): " \
                             f"{sorted(modules - names)}"
    assert configs <= names, f"configs missing from the wheel: {sorted(configs - names)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "xentlit = xentlit.commands:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _table(path: Path, rows: int = 160, seed: int = 0) -> pd.DataFrame:
    """A small table: two numbers, a category and a 3-class label that depends on them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2))
    colour = rng.choice(["red", "green", "blue"], size=rows)
    label = np.where(x[:, 0] + (colour == "red") > 0.5, "a", np.where(x[:, 1] > 0, "b", "c"))
    frame = pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "colour": colour, "label": label})
    frame.to_csv(path, index=False)
    return frame


def test_the_wheel_trains_evaluates_and_predicts_from_an_empty_directory(installed, tmp_path):
    venv, env = installed
    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import importlib.util as u; print(u.find_spec('xentlit').origin)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not a source tree

    # the command and its module form; a bare `python -m xentlit.cli` says how to use it instead of doing nothing
    assert "train" in _run(["xentlit", "--help"], cwd=tmp_path, env=env).stdout
    bare = subprocess.run([python, "-m", "xentlit.cli"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bare.returncode == 2 and "usage: xentlit <command>" in bare.stderr

    work = tmp_path / "empty"
    work.mkdir()
    frame = _table(work / "table.csv")
    _run(["xentlit", "train", "data=files", "data.path=table.csv", "data.label_column=label", "trainer.max_epochs=3",
          "callbacks.plots=null", "data.batch_size=32"], cwd=work, env=env)
    [run] = run_dirs(work / "outputs" / "train")
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["status"] == "completed" and trained["metrics"]["test/acc"] > 0.5
    checkpoint = Path(trained["best_checkpoint"])

    result = _run([python, "-m", "xentlit", "eval", f"ckpt_path={checkpoint}"], cwd=work, env=env)
    [evaluated] = run_dirs(work / "outputs" / "eval")
    assert json.loads((evaluated / "metrics.json").read_text())["metrics"]["test/acc"] == pytest.approx(
        trained["metrics"]["test/acc"])  # the same test split, the same weights
    assert "test/acc" in result.stdout

    _run(["xentlit", "predict", f"ckpt_path={checkpoint}", "input=table.csv", "output=predictions.csv"],
         cwd=work, env=env)
    predictions = pd.read_csv(work / "predictions.csv")
    assert len(predictions) == len(frame)
    assert set(predictions["prediction"]) <= {"a", "b", "c"}
    assert np.allclose(predictions[["prob_a", "prob_b", "prob_c"]].sum(axis=1), 1.0, atol=1e-5)
    accuracy = (predictions["prediction"] == frame["label"]).mean()
    assert accuracy == pytest.approx(json.loads((work / "predictions.csv.metrics.json").read_text())["acc"])
