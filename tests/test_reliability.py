"""Interrupted runs resume exactly; same seed, same numbers; checkpoints from another data shape fail clearly."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SCRIPTS, read_metrics, run_dirs, run_script

pytestmark = pytest.mark.slow
# Small batches make epochs long enough to be interrupted in the middle; deterministic kernels on CPU.
RUN = ["trainer.max_epochs=5", "trainer.deterministic=true", "data.batch_size=16", "model.dropout=0.1",
       "scheduler=cosine", "callbacks=[model_checkpoint,early_stopping]"]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _interrupt(cwd: Path, sig: signal.Signals, after_epoch: int) -> Path:
    """Start a run, wait until epoch `after_epoch` is checkpointed, then send `sig` in the next epoch."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train.py"), *RUN], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list(cwd.rglob(f"epoch_{after_epoch:03d}.ckpt"))
        if ckpts:
            time.sleep(0.2)  # into the next epoch
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    [run] = run_dirs(cwd / "outputs")
    if sig == signal.SIGKILL:
        assert not (run / "metrics.json").exists()
    else:  # a stop it could handle: recorded as such, never looking like a finished run
        assert read_metrics(run)["status"] == "interrupted" and read_metrics(run)["metrics"] == {}
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("whole")
    run_script("train.py", *RUN, cwd=cwd)
    [run] = run_dirs(cwd / "outputs")
    return run


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_to_the_same_parameters_and_metrics(uninterrupted, tmp_path, sig):
    run = _interrupt(tmp_path, sig, after_epoch=1)
    logged_before = (run / "csv" / "metrics.csv").read_text()
    run_script("train.py", f"resume={run}", cwd=tmp_path)
    assert run_dirs(tmp_path / "outputs") == [run], "resuming must continue in the same run directory"

    expected, resumed = _final_state(uninterrupted), _final_state(run)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    a, b = read_metrics(uninterrupted)["metrics"], read_metrics(run)["metrics"]
    for name in ("test/acc", "test/loss", "val/acc_best", "val/loss"):
        assert a[name] == b[name], name
    # nothing logged before the interruption is lost; every epoch is logged
    import pandas as pd

    before, after = pd.read_csv(io.StringIO(logged_before)), pd.read_csv(run / "csv" / "metrics.csv")
    assert len(after) > len(before) and set(before["epoch"]) < set(after["epoch"])
    assert sorted(after.dropna(subset=["val/loss"])["epoch"].unique()) == [0, 1, 2, 3, 4]


def test_same_seed_gives_identical_metrics_and_seed_zero_is_valid(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_script("train.py", "seed=0", "trainer.max_epochs=2", "trainer.deterministic=true", cwd=tmp_path / name)
    [a], [b] = run_dirs(tmp_path / "a" / "outputs"), run_dirs(tmp_path / "b" / "outputs")
    assert read_metrics(a)["metrics"] == read_metrics(b)["metrics"]
    state_a, state_b = _final_state(a), _final_state(b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_resume_of_a_directory_that_is_not_a_run_fails_clearly(tmp_path):
    result = run_script("train.py", f"resume={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"resume={tmp_path}: not a run directory" in result.stderr


def test_checkpoint_of_another_number_of_classes_fails_clearly(uninterrupted, tmp_path):
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    result = run_script("train.py", "data=synthetic", "data.num_classes=3", "data.num_features=64",
                        f"ckpt_path={ckpt}", "trainer.max_epochs=1", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "the checkpoint does not fit this model" in result.stderr
    assert "net.head.weight: checkpoint (10, 256) vs model (3, 256)" in result.stderr


def test_two_runs_started_together_get_separate_run_directories(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(SCRIPTS / "train.py"), "trainer.max_epochs=1"]
    procs = [subprocess.Popen([*command, f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == 2 and runs[0] != runs[1]
    seeds = sorted(int((r / ".hydra" / "overrides.yaml").read_text().split("seed=")[1].split()[0]) for r in runs)
    assert seeds == [1, 2]
    assert all(len((r / "csv" / "metrics.csv").read_text().splitlines()) >= 2 for r in runs)


CRASH_WHILE_SAVING = r"""
import os, sys
import fsspec.implementations.local as local
import lightning.pytorch as pl
from xentlit import MLP, DigitsDataModule, XentModule

class CrashDuringThirdSave(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 2:  # the next checkpoint write dies half-way, like a kill mid-write
            real_write = local.LocalFileOpener.write
            def half_then_die(self, data):
                real_write(self, data[: len(data) // 2]); self.f.flush(); os._exit(137)
            local.LocalFileOpener.write = half_then_die

pl.seed_everything(0)
checkpoint = pl.callbacks.ModelCheckpoint(dirpath=sys.argv[1], save_last=True, monitor="val/loss")
trainer = pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                     callbacks=[CrashDuringThirdSave(), checkpoint])
trainer.fit(XentModule(MLP(64, 10)), datamodule=DigitsDataModule())
"""


def test_a_crash_while_saving_leaves_the_last_good_checkpoint_intact(tmp_path):
    result = subprocess.run([sys.executable, "-c", CRASH_WHILE_SAVING, str(tmp_path)], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 137, result.stderr[-2000:]
    from xentlit.cli import load_checkpoint

    last = load_checkpoint(tmp_path / "last.ckpt")  # readable, not truncated
    assert last["epoch"] == 1  # the epoch before the interrupted save
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted inside tmp_path: a filesystem other than $TMPDIR's (needs root; skipped otherwise)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


LONG = [*RUN[1:], "trainer.max_epochs=15"]  # epochs of ~0.3 s: many moments to be killed at


def test_kills_at_random_moments_on_another_filesystem_resume_bitwise(tmpfs, tmp_path):
    """SIGKILL several times at random moments (checkpoint writes included); every resume continues the same run:
    the final parameters are bitwise those of the uninterrupted run, no CSV row twice, no stray file."""
    import csv
    import random

    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (tmp_path / "whole").mkdir()
    run_script("train.py", *LONG, cwd=tmp_path / "whole")
    [uninterrupted] = run_dirs(tmp_path / "whole" / "outputs")
    run = None
    for attempt in range(4):
        args = [*LONG] if run is None else [f"resume={run}"]
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train.py"), *args], cwd=tmpfs, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 3:  # the last one runs to the end
            assert proc.wait(timeout=300) == 0
            break
        newest = max((p.stat().st_mtime_ns for p in tmpfs.rglob("*.ckpt")), default=0)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until this process wrote a checkpoint
            if max((p.stat().st_mtime_ns for p in tmpfs.rglob("*.ckpt")), default=0) > newest:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere in the next epochs, or inside a checkpoint write
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait(timeout=60)
        [run] = run_dirs(tmpfs / "outputs")
    [run] = run_dirs(tmpfs / "outputs")
    expected, resumed = _final_state(uninterrupted), _final_state(run)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    keys = [(float(r["epoch"]), r["step"], tuple(k for k, v in r.items() if v and k not in ("epoch", "step")))
            for r in rows if r.get("epoch")]
    assert len(keys) == len(set(keys)), "a CSV row logged twice"
    assert not list(run.rglob("*.tmp")), "a temp file left behind"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "last.ckpt" and len(names) == 2, names  # save_top_k=1: one best, plus last
    assert read_metrics(run)["status"] == "completed"


def test_a_full_disk_ends_with_one_line_and_the_run_resumes_once_space_is_freed(tmpfs):
    subprocess.run(["mount", "-o", "remount,size=2600k", str(tmpfs)], check=True)
    result = run_script("train.py", *LONG, cwd=tmpfs, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("xentlit: no space left on the device writing "), result.stderr[-3000:]
    assert "resume=" in last_line
    assert "Traceback" not in result.stderr
    [run] = run_dirs(tmpfs / "outputs")
    assert str(run) in last_line
    from xentlit.cli import load_checkpoint

    before = load_checkpoint(run / "checkpoints" / "last.ckpt")  # intact, readable
    assert not list(run.rglob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=256m", str(tmpfs)], check=True)
    run_script("train.py", f"resume={run}", cwd=tmpfs)
    assert read_metrics(run)["status"] == "completed"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] > before["epoch"]
