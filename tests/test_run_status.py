"""How a run ended is recorded in metrics.json and said on the console's last line; the exit status follows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SCRIPTS, read_metrics, run_dirs, run_script

pytestmark = pytest.mark.slow


def _last_line(result: subprocess.CompletedProcess) -> str:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("xentlit: run")][-1]


def test_a_diverged_run_exits_non_zero_and_says_so(tmp_path):
    result = run_script("train.py", "optimizer=sgd", "optimizer.lr=100", "trainer.max_epochs=6", cwd=tmp_path,
                        check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    [run] = run_dirs(tmp_path / "outputs")
    summary = read_metrics(run)
    assert summary["status"] == "diverged" and "test/acc" in summary["metrics"]
    assert _last_line(result).startswith("xentlit: run diverged: the convergence doctor stopped training")


def test_a_sweep_gives_a_diverged_job_the_worst_objective_and_goes_on(tmp_path):
    result = run_script("train.py", "-m", "optimizer=sgd", "optimizer.lr=100,0.05", "trainer.max_epochs=3",
                        cwd=tmp_path)
    assert result.returncode == 0
    statuses = sorted(read_metrics(run)["status"] for run in run_dirs(tmp_path))
    assert statuses == ["completed", "diverged"]


def test_a_completed_run_says_so(tmp_path):
    result = run_script("train.py", "trainer.max_epochs=1", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    assert read_metrics(run)["status"] == "completed"
    assert _last_line(result) == f"xentlit: run completed ({run})"


def test_a_run_that_fails_after_composing_records_the_failure(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    result = run_script("train.py", "data=files", f"data.path={tmp_path / 'empty.csv'}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    [run] = [p.parent for p in (tmp_path / "outputs").rglob("metrics.json")]
    summary = read_metrics(run)
    assert summary["status"] == "failed" and "empty.csv is empty" in summary["error"]


def test_ctrl_c_prints_the_resume_command_and_the_run_resumes(tmp_path):
    # no early stopping: the run must still be training when the signal comes, however fast the machine
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train.py"), "trainer.max_epochs=60", "data.batch_size=16",
                             "callbacks.early_stopping=null"],
                            # as at a terminal: Ctrl-C is not ignored (a pytest worker may have inherited or set an
                            # ignored SIGINT, which a child would inherit; Python then never raises KeyboardInterrupt)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(tmp_path.rglob("epoch_*.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    [run] = run_dirs(tmp_path / "outputs")
    assert f"Continue with: python scripts/train.py resume={run}" in output
    assert read_metrics(run)["status"] == "interrupted"
    run_script("train.py", f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path)
    assert read_metrics(run)["status"] == "completed"


def test_a_damaged_last_ckpt_resumes_from_the_newest_valid_checkpoint(tmp_path):
    run_script("train.py", "trainer.max_epochs=3", "callbacks.early_stopping=null", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    last.write_bytes(last.read_bytes()[:1000])
    [best] = [p for p in (run / "checkpoints").glob("epoch_*.ckpt")]
    result = run_script("train.py", f"resume={run}", "trainer.max_epochs=4", cwd=tmp_path)
    assert f"last.ckpt is corrupt or truncated and cannot be read; resuming from {best.name} instead" in (
        result.stdout + result.stderr)
    assert read_metrics(run)["status"] == "completed"
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_resume_forgets_rows_logged_after_its_checkpoint_and_a_torn_last_line(tmp_path):
    """A kill after the CSV flush but before the next checkpoint leaves rows the resumed run logs again."""
    import csv

    run_script("train.py", "trainer.max_epochs=3", "callbacks.early_stopping=null", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    log = run / "csv" / "metrics.csv"
    rows = list(csv.DictReader(log.open()))
    last_epoch = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert last_epoch == 2
    stale = [dict(row, epoch="3") for row in rows if row["epoch"] == "2" and row.get("train/loss")]
    with log.open("a", newline="") as f:  # what a killed epoch 3 had flushed, then half a line
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writerows(stale)
        f.write("3,1")
    run_script("train.py", f"resume={run}", "trainer.max_epochs=5", "callbacks.early_stopping=null", cwd=tmp_path)
    after = list(csv.DictReader(log.open()))
    keys = [(float(r["epoch"]), r["step"], tuple(k for k, v in r.items() if v and k not in ("epoch", "step")))
            for r in after]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert all(None not in r.values() for r in after)
    epochs_with_train_rows = sorted(float(r["epoch"]) for r in after if r.get("train/loss"))
    assert epochs_with_train_rows == [0, 1, 2, 3, 4]


def test_a_run_killed_while_testing_resumes_to_a_full_metrics_file(tmp_path):
    """last.ckpt holds the final epoch: the resumed fit has nothing to train, yet metrics.json gets the
    validation metrics (and val/acc_best, what sweeps optimise) besides the test ones."""
    run_script("train.py", "trainer.max_epochs=2", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    whole = read_metrics(run)["metrics"]
    (run / "metrics.json").unlink()  # as if killed during the test stage
    run_script("train.py", f"resume={run}", cwd=tmp_path)
    resumed = read_metrics(run)["metrics"]
    for name in ("val/acc", "val/acc_best", "val/nll", "test/acc"):
        assert name in resumed, name
    assert resumed["val/acc_best"] == pytest.approx(whole["val/acc_best"], abs=1e-6)
    assert resumed["test/acc"] == pytest.approx(whole["test/acc"], abs=1e-6)
