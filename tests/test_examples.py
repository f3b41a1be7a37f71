"""The example of using xentlit from another project runs and learns."""

import subprocess
import sys

from conftest import ROOT


def test_own_project_example_trains_a_subclass_on_user_tensors():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_project.py")], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = dict(line.split() for line in result.stdout.strip().splitlines() if line.startswith("test/"))
    assert float(metrics["test/balanced_acc"]) > 0.7
    assert 0.5 < float(metrics["test/mean_confidence"]) <= 1.0
