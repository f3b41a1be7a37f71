"""End-to-end: the real scripts/train.py in subprocesses — default run, overrides, -m sweep, DDP, user subclass."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from conftest import read_metrics, run_dirs, run_script

pytestmark = pytest.mark.slow


def test_default_run_reaches_95_percent_on_digits(tmp_path):
    """The README's no-argument command, as is: trains on CPU, tests the best checkpoint, writes metrics.json."""
    result = run_script("train.py", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    summary = read_metrics(run)
    assert summary["metrics"]["test/acc"] >= 0.95
    assert summary["best_checkpoint"].startswith(str(run))
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "csv" / "metrics.csv").exists()
    assert (run / ".hydra" / "config.yaml").exists()
    assert "test/acc" in result.stdout and "final metrics" in result.stdout
    # no warning spam on the default run
    output = result.stdout + result.stderr
    assert "Warning" not in output and "warn(" not in output and "💡" not in output, output[-3000:]
    # nor noise: FLOPs that were never measured, a logging interval longer than the epoch, Lightning's note that
    # xentlit brings its own model summary, "INFO:" twice over
    for noise in ("FLOPs", "Flops", "logging interval", "model summary callbacks", "INFO:"):
        assert noise not in output, (noise, output[-3000:])
    # stdout is not a terminal here: plain lines, no table frames or bars, nothing cut short; a line per epoch
    assert not any(c in result.stdout for c in "┏┃│…━"), result.stdout[-3000:]
    epochs = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] + 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == epochs and lines[0].startswith("epoch 0/29: train/loss ") and " val/acc " in lines[0]
    best_line = re.compile(rf"^best_checkpoint +{re.escape(summary['best_checkpoint'])}$", re.MULTILINE)
    assert best_line.search(result.stdout), result.stdout[-3000:]
    assert "calibration/temperature" in result.stdout  # the default post-hoc step, in the final table
    # the run's log is in the run directory: Lightning's messages, the model summary, the doctor, the final table
    log = (run / "train.log").read_text()
    for line in ("GPU available", "Model summary", lines[-1], "ConvergenceDoctor: no problems found",
                 "xentlit: final metrics", f"xentlit: run completed ({run})"):
        assert line in log, (line, log[-3000:])
    assert best_line.search(log), log[-3000:]
    assert log.count("xentlit: final metrics") == 1
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "confusion_matrix.png", "curves.png", "per_class.png", "reliability.png"]


def test_help_lists_the_config_groups_and_options(tmp_path):
    result = run_script("train.py", "--help", cwd=tmp_path)
    for line in ("optimizer: adam, adamw, sgd", "scheduler: cosine, none, onecycle, plateau, step",
                 "trainer: cpu, ddp, ddp_cpu, default, gpu", "precision: bf16, fp16, fp32"):
        assert line in result.stdout


def test_overrides_change_the_run(tmp_path):
    run_script("train.py", "loss.label_smoothing=0.1", "loss.class_weights=balanced", "optimizer=adamw",
               "optimizer.lr=3e-3", "trainer.max_epochs=2", "scheduler=cosine", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in config and "AdamW" in config and "CosineAnnealingLR" in config
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1
    weight = checkpoint["state_dict"]["loss.weight"]
    assert weight.shape == (10,) and not torch.allclose(weight, torch.ones(10))  # balanced weights were fitted


def test_multirun_sweep_gives_one_run_dir_per_job(tmp_path):
    run_script("train.py", "-m", "loss.label_smoothing=0,0.2", "seed=1,2", "trainer.max_epochs=1", cwd=tmp_path)
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == 4
    import yaml

    jobs = set()
    for r in runs:  # each job ran its own combination, to a real result
        config = yaml.safe_load((r / ".hydra" / "config.yaml").read_text())
        jobs.add((config["loss"]["label_smoothing"], config["seed"]))
        assert read_metrics(r)["metrics"]["test/acc"] > 0.3  # far above chance (0.1) after one epoch
        # the job directory is named by its number and overrides
        assert r.name.split("_", 1)[1] == (f"loss.label_smoothing={config['loss']['label_smoothing']:g},"
                                           f"seed={config['seed']},trainer.max_epochs=1")
    assert jobs == {(0.0, 1), (0.0, 2), (0.2, 1), (0.2, 2)}
    assert sorted(r.name.split("_")[0] for r in runs) == ["0", "1", "2", "3"]

    # the sweep's summary: one row per job, its overrides and its final metrics, beside the jobs
    sweep = runs[0].parent
    import pandas as pd

    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["job"]) == sorted((r.name for r in runs), key=lambda name: int(name.split("_")[0]))
    for row in table.itertuples():
        metrics = read_metrics(sweep / row.job)["metrics"]
        assert row.status == "completed"
        assert table.loc[row.Index, "test/acc"] == pytest.approx(metrics["test/acc"])
        assert table.loc[row.Index, "val/acc_best"] == pytest.approx(metrics["val/acc_best"])
        assert f"seed={table.loc[row.Index, 'seed']}" in row.job
    assert sorted(zip(table["loss.label_smoothing"], table["seed"])) == [(0.0, 1), (0.0, 2), (0.2, 1), (0.2, 2)]
    markdown = (sweep / "summary.md").read_text()
    assert "Every job: trainer.max_epochs=1" in markdown and markdown.count("| completed |") == 4
    best = table.loc[table["val/acc_best"].idxmax(), "job"]
    assert f"Best by val/acc_best (max): {best}" in markdown


def test_ddp_cpu_two_processes_one_run_dir(tmp_path):
    result = run_script("train.py", "trainer=ddp_cpu", "trainer.max_epochs=2", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    assert (tmp_path / "outputs" / "train" / "runs").is_dir()
    assert len(list((tmp_path / "outputs" / "train" / "runs").iterdir())) == 1
    summary = read_metrics(run)
    assert summary["metrics"]["test/acc"] > 0.5
    assert "world_size=2" in result.stdout + result.stderr or "GLOBAL_RANK: 1" in result.stdout + result.stderr
    # xentlit's epoch metrics are synced by torchmetrics: no "use sync_dist=True" advice, no deprecation noise
    assert "sync_dist" not in result.stderr and "deprecated" not in result.stderr, result.stderr[-3000:]
    # the checkpoint written under DDP loads on one process
    from xentlit import MLP, XentModule

    module = XentModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", net=MLP(64, 10), weights_only=True)
    assert module.num_classes == 10


def test_subclass_defined_outside_the_package_trains_through_the_script(tmp_path):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "mymodels.py").write_text(textwrap.dedent('''
        import torch
        from xentlit import XentModule, DigitsDataModule

        class ScaledModule(XentModule):
            """Divides logits by a learned temperature."""
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.log_temperature = torch.nn.Parameter(torch.zeros(()))
            def forward(self, x):
                return self.net(x) / self.log_temperature.exp()

        class HalfDigits(DigitsDataModule):
            """Only the even-numbered rows of digits."""
            def load(self):
                x, y, names = super().load()
                return x[::2], y[::2], names
    '''))
    run_script("train.py", "module._target_=mymodels.ScaledModule", "data._target_=mymodels.HalfDigits",
               "trainer.max_epochs=3", cwd=tmp_path, env={"PYTHONPATH": str(project)})
    [run] = run_dirs(tmp_path / "outputs")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "log_temperature" in state and state["log_temperature"].item() != 0.0
    assert read_metrics(run)["metrics"]["test/acc"] > 0.5
