"""Loggers, -m sweeps and debug presets through the real scripts/train.py, read back from the files they write.

Everything runs offline: MLflow with a SQLite store inside the run directory, W&B in offline mode.
A logger's tests skip only when its package is not installed (``pip install -e ".[loggers]"``).
The Optuna search (``scripts/search.py``) is tested in test_search.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_metrics, run_dirs, run_script

SMOOTHING = 0.05  # a distinctive value to find in every logger's record of the resolved config
OPTIONAL_LOGGERS = {"mlflow": "mlflow", "wandb": "wandb"}  # logger option -> package it needs


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _config_keys(run: Path) -> set[str]:
    """Top-level keys of the run's composed config (what `cli.train` logs as hyperparameters)."""
    return set(yaml.safe_load((run / ".hydra" / "config.yaml").read_text()))


# ------------------------------------------------------------------------------------------- loggers


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    """One real 2-epoch run logging to every installed logger at once; returns its run directory."""
    cwd = tmp_path_factory.mktemp("loggers")
    loggers = ["csv", "tensorboard"] + [name for name, module in OPTIONAL_LOGGERS.items() if _installed(module)]
    run_script("train.py", f"logger=[{','.join(loggers)}]", f"loss.label_smoothing={SMOOTHING}",
               "trainer.max_epochs=2", cwd=cwd)
    [run] = run_dirs(cwd / "outputs")
    return run


def _assert_logged_once(hparams: dict, run: Path) -> None:
    """The logged hyperparameters are exactly the resolved config: no second, flat set from the
    module's / datamodule's own ``save_hyperparameters`` (``num_classes``, ``ece_bins``, ``batch_size``...)."""
    extra = set(hparams) - _config_keys(run)
    assert not extra, f"hyperparameters logged besides the resolved config: {sorted(extra)}"
    assert hparams["loss"]["label_smoothing"] == SMOOTHING
    assert hparams["optimizer"]["lr"] == 1e-3 and hparams["seed"] == 42
    assert hparams["paths"]["output_dir"] == str(run)  # resolved, not ${hydra:runtime.output_dir}


@pytest.mark.slow
def test_csv_logger_writes_every_epoch_and_the_resolved_config(logged_run):
    with open(logged_run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val_loss) == 2 and all(math.isfinite(v) and v > 0 for v in val_loss)
    assert [r["epoch"] for r in rows if r.get("train/acc")] == ["0", "1"]
    # one meaning of `step` in every row (train, val, the doctor's): optimiser steps taken, as the checkpoint counts
    # them, though a Lightning step runs several of them here (steps_per_execution=auto)
    by_epoch = {}
    for r in rows:
        if not r.get("test/acc"):
            by_epoch.setdefault(r["epoch"], set()).add(int(r["step"]))
    assert sorted(by_epoch) == ["0", "1"] and all(len(steps) == 1 for steps in by_epoch.values()), by_epoch
    [first], [last] = by_epoch["0"], by_epoch["1"]
    assert last == 2 * first == torch.load(logged_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert first > 8  # optimiser steps, not Lightning steps (groups of 8 batches)
    [test_acc] = [float(r["test/acc"]) for r in rows if r.get("test/acc")]
    assert test_acc == pytest.approx(read_metrics(logged_run)["metrics"]["test/acc"])
    _assert_logged_once(yaml.safe_load((logged_run / "csv" / "hparams.yaml").read_text()), logged_run)


@pytest.mark.slow
def test_tensorboard_logger_writes_scalar_events(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard"))
    events.Reload()
    assert {"val/loss", "val/acc", "val/acc_best", "train/loss", "test/acc"} <= set(events.Tags()["scalars"])
    val_loss = events.Scalars("val/loss")
    assert len(val_loss) == 2 and val_loss[0].step < val_loss[1].step
    assert val_loss[-1].value == pytest.approx(read_metrics(logged_run)["metrics"]["val/loss"])
    _assert_logged_once(yaml.safe_load((logged_run / "tensorboard" / "hparams.yaml").read_text()), logged_run)


@pytest.mark.slow
def test_mlflow_logger_writes_a_local_sqlite_store(logged_run):
    pytest.importorskip("mlflow", reason="MLflow logger needs `pip install -e .[loggers]`")
    from mlflow.tracking import MlflowClient

    store = logged_run / "mlflow.db"
    assert store.is_file()
    assert not (logged_run.parents[3] / "mlruns").exists()  # nothing written outside the run directory
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("train")  # experiment_name: ${task_name}
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(logged_run)

    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(history) == 2 and history[0].step < history[1].step
    summary = read_metrics(logged_run)["metrics"]
    for name in ("val/acc_best", "test/acc"):
        assert run.data.metrics[name] == pytest.approx(summary[name])

    params = run.data.params  # the resolved config, flattened with "/"
    assert params["loss/label_smoothing"] == str(SMOOTHING)
    assert params["optimizer/lr"] == "0.001" and params["seed"] == "42"
    assert params["paths/output_dir"] == str(logged_run)
    extra = {key.split("/")[0] for key in params} - _config_keys(logged_run)
    assert not extra, f"hyperparameters logged besides the resolved config: {sorted(extra)}"


def _wandb_records(path: Path):
    """Decode a W&B transaction log (``run-*.wandb``): a LevelDB-style log of ``Record`` protobufs.

    An offline run keeps its config and history only there (wandb 0.31 writes no files/config.yaml for it,
    and no longer ships a Python reader for this format).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, chunk = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles blocks: the rest is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _read_wandb_run(run: Path) -> dict:
    found = sorted((run / "wandb").glob("offline-run-*"))
    assert len(found) == 1, f"expected one W&B offline run under {run}, found {found}"
    [run_dir] = found
    [log] = sorted(run_dir.glob("run-*.wandb"))
    config: dict = {}
    history: dict[str, list[float]] = {}
    kinds: set[str] = set()
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return {"config": config, "history": history, "kinds": kinds, "dir": run_dir}


@pytest.mark.slow
def test_wandb_logger_writes_an_offline_run(logged_run):
    pytest.importorskip("wandb", reason="W&B logger needs `pip install -e .[loggers]`")
    run = _read_wandb_run(logged_run)
    assert run["dir"].parent == logged_run / "wandb"  # save_dir: ${paths.output_dir}
    assert "exit" in run["kinds"], "the W&B run was not finished"
    assert len(run["history"]["val/loss"]) == 2
    assert run["history"]["val/acc_best"][-1] == pytest.approx(read_metrics(logged_run)["metrics"]["val/acc_best"])
    assert run["config"]["logger"]["wandb"]["offline"] is True
    _assert_logged_once(run["config"], logged_run)


@pytest.mark.slow
def test_wandb_gives_each_job_of_a_sweep_its_own_run(tmp_path):
    """W&B keeps one global run per process: each job of a ``-m`` sweep must finish its own."""
    pytest.importorskip("wandb", reason="W&B logger needs `pip install -e .[loggers]`")
    run_script("train.py", "-m", "logger=wandb", "seed=1,2", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
               cwd=tmp_path)
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == 2
    for run in runs:
        wandb_run = _read_wandb_run(run)
        assert wandb_run["config"]["seed"] == yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"]
        assert len(wandb_run["history"]["val/loss"]) == 1  # one epoch: nothing from the other job


# ------------------------------------------------------------------------------------------- debug presets


@pytest.mark.parametrize("preset", ["default", "fdr", "overfit", "profiler"])
def test_debug_presets_compose_and_build_a_trainer(compose, preset, tmp_path):
    from hydra.utils import instantiate

    from xentlit.cli import _instantiate_group, resolve_monitor

    cfg = compose(f"debug={preset}", f"paths.output_dir={tmp_path}")
    # debug runs land in outputs/debug/, apart from real ones (needs `_self_` first in train.yaml's defaults)
    assert cfg.task_name == "debug", "conf/train.yaml's own values override the debug preset's"
    assert cfg.trainer.deterministic is True
    resolve_monitor(cfg, instantiate(cfg.loss))  # as the training script does
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_group(cfg.callbacks), logger=False)
    if preset == "fdr":
        assert trainer.fast_dev_run == 1 and trainer.checkpoint_callback is None
    if preset == "overfit":
        assert cfg.trainer.overfit_batches == 3 and trainer.max_epochs >= 20
        assert trainer.checkpoint_callback is None and trainer.early_stopping_callback is None
    if preset == "profiler":
        assert type(trainer.profiler).__name__ == "SimpleProfiler"
        assert Path(trainer.profiler.dirpath) == tmp_path / "profiler"


def _only_run(cwd: Path) -> Path:
    runs = run_dirs(cwd / "outputs")
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_fast_dev_run_runs_one_batch_and_writes_no_checkpoint(tmp_path):
    run_script("train.py", "debug=fdr", cwd=tmp_path, timeout=120)
    run = _only_run(tmp_path)
    summary = read_metrics(run)
    assert summary["best_checkpoint"] is None
    assert not list(tmp_path.rglob("*.ckpt"))
    hits = summary["metrics"]["test/acc"] * 64  # one test batch of 64 rows
    assert abs(hits - round(hits)) < 1e-4 and math.isfinite(summary["metrics"]["test/loss"])
    assert not (run / "csv").exists()  # Lightning mutes loggers in a fast dev run


@pytest.mark.slow
def test_overfit_preset_memorises_three_batches(tmp_path):
    run_script("train.py", "debug=overfit", cwd=tmp_path, timeout=180)
    run = _only_run(tmp_path)
    metrics = read_metrics(run)["metrics"]
    assert metrics["train/acc"] == 1.0
    with open(run / "csv" / "metrics.csv", newline="") as f:
        train_loss = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(train_loss) >= 20  # every epoch ran: early stopping did not interfere
    assert train_loss[-1] < 0.05 < 1.0 < train_loss[0]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_profiler_preset_writes_reports_into_the_run_directory(tmp_path):
    run_script("train.py", "debug=profiler", cwd=tmp_path, timeout=120)
    run = _only_run(tmp_path)
    fit = (run / "profiler" / "fit-profile.txt").read_text()
    assert "FIT Profiler Report" in fit and "run_training_epoch" in fit and "training_step" in fit
    total = next(line for line in fit.splitlines() if line.strip("| ").startswith("Total"))
    assert int(total.split("|")[3]) > 10  # Num calls of all profiled actions
    assert "test_step" in (run / "profiler" / "test-profile.txt").read_text()
