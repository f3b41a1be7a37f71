"""Scale-out gives the same answer: real 2-process DDP (gloo) against single-process references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import ddp_scenarios as scenarios
from conftest import read_metrics, run_dirs, run_script

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def _ddp_run(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    result = subprocess.run([sys.executable, str(HERE / "ddp_scenarios.py"), str(out), mode], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def _single_process_big_batch() -> list[torch.Tensor]:
    x, y = scenarios.make_problem()
    module = scenarios.make_module("local")
    loader = DataLoader(scenarios.TensorBatchDataset(x, y), batch_size=32, collate_fn=scenarios.collate_batch)
    scenarios.trainer(accelerator="cpu", devices=1, precision="64-true", max_steps=1, limit_val_batches=0).fit(
        module, train_dataloaders=loader)
    return [p.detach() for p in module.net.parameters()]


def test_two_ranks_with_accumulation_equal_one_big_batch(tmp_path):
    """2 ranks x accumulation 2 x batch 8, weights + ignore index + smoothing, uneven ignored rows per rank."""
    reference = _single_process_big_batch()
    exact = _ddp_run(tmp_path, "auto")
    assert exact["world_size"] == 2
    for p_ref, p_ddp in zip(reference, exact["params"]):
        torch.testing.assert_close(torch.tensor(p_ddp, dtype=torch.float64), p_ref, atol=1e-6, rtol=0)

    naive = _ddp_run(tmp_path, "local")  # per-rank, per-micro-batch means: a different gradient
    gap = max((torch.tensor(p, dtype=torch.float64) - r).abs().max().item() for p, r in zip(naive["params"], reference))
    assert gap > 1e-4

    # evaluation metrics under DDP equal single-process metrics: no sample padded in twice
    torch.manual_seed(3)
    module = scenarios.XentModule(scenarios.MLP(5, 4, hidden_sizes=[6]),
                                  loss=scenarios.CrossEntropyLoss(class_weights=scenarios.WEIGHTS))
    [single] = scenarios.trainer(accelerator="cpu", devices=1).validate(
        module, datamodule=scenarios.make_eval_data(), verbose=False)
    for name, value in single.items():
        assert exact["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_steps_per_execution_under_ddp_fails_clearly(tmp_path):
    """DDP syncs gradients once per wrapped forward, so several optimiser steps per Lightning step are refused."""
    out = tmp_path / "spe.json"
    result = subprocess.run([sys.executable, str(HERE / "ddp_scenarios.py"), str(out), "steps_per_execution"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not out.exists()
    assert "steps_per_execution=2 cannot be combined with 2 processes (DDP)" in result.stderr


def test_torchrun_launch_gives_one_run_dir_and_a_loadable_checkpoint(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    run_script("train.py", "trainer=ddp_cpu", "trainer.max_epochs=2", cwd=tmp_path, launcher=launcher)
    runs_root = tmp_path / "outputs" / "train" / "runs"
    [run] = list(runs_root.iterdir())
    summary = read_metrics(run)
    assert summary["metrics"]["test/acc"] > 0.5
    assert len(list((tmp_path / "outputs").rglob("metrics.csv"))) == 1
    import pandas as pd

    log = pd.read_csv(run / "csv" / "metrics.csv")
    val = log.dropna(subset=["val/loss"])
    assert sorted(val["epoch"]) == [0, 1]  # written once per epoch, by rank 0 only
    module = scenarios.XentModule.load_from_checkpoint(
        run / "checkpoints" / "last.ckpt", net=scenarios.MLP(64, 10), weights_only=True)
    assert module.num_classes == 10


def test_multirun_sweep_with_ddp_gives_each_job_its_own_single_run_dir(tmp_path):
    run_script("train.py", "-m", "trainer=ddp_cpu", "seed=1,2", "trainer.max_epochs=1", cwd=tmp_path)
    multiruns = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(multiruns) == 1, "the DDP child processes must not start sweeps of their own"
    jobs = sorted(p for p in multiruns[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0_seed=1,trainer.max_epochs=1,trainer=ddp_cpu",
                                      "1_seed=2,trainer.max_epochs=1,trainer=ddp_cpu"]
    assert run_dirs(tmp_path / "outputs") == jobs
    seeds = [read_metrics(j) for j in jobs]
    assert all(s["metrics"]["test/acc"] > 0.3 for s in seeds)
    assert not (tmp_path / "outputs" / "train" / "runs").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_gpu_run_with_mixed_precision_and_cpu_loadable_checkpoint(tmp_path, precision):
    run_script("train.py", "trainer=gpu", f"trainer.precision={precision}", "trainer.max_epochs=5", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    assert read_metrics(run)["metrics"]["test/acc"] > 0.9
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
