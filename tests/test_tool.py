"""The ``xentlit`` command's parts, in process: the dispatcher, ``threads=``, the console's tables and the summary
of a ``-m`` sweep (the end-to-end runs are in test_install.py, test_train_script.py and test_user_configs.py)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from xentlit import commands
from xentlit.console import ModelSummary, show_table
from xentlit.entry import package_config_dir, set_threads
from xentlit.sweeps import MAX_DIRNAME, job_dirname, write_sweep_summary

from conftest import CONF


def test_every_command_is_a_function_and_the_dispatcher_refuses_what_is_not_one(capsys):
    for name, (target, about) in commands.COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)) and about
    assert commands.main(["xentlit"]) == 2 and "usage: xentlit <command>" in capsys.readouterr().err
    assert commands.main(["xentlit", "--help"]) == 0 and "predict" in capsys.readouterr().out
    assert commands.main(["xentlit", "trian"]) == 2
    assert "unknown command 'trian'; the commands are train, eval, predict, search" in capsys.readouterr().err


def test_a_clone_uses_its_top_level_conf():
    assert package_config_dir() == CONF


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_sets_torchs_intra_op_threads(threads_restored, compose):
    assert compose().threads == 1  # the measured default (README: Speed)
    set_threads(2)
    assert torch.get_num_threads() == 2
    set_threads(None)  # torch's own default: left as it is
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads=0: expected a number of torch intra-op threads >= 1"):
        set_threads(0)
    with pytest.raises(Exception, match="threads"):
        compose("threads=many")


def test_job_dirnames_are_filesystem_safe_bounded_and_keep_the_job_number():
    assert job_dirname(3, "loss=focal,optimizer.lr=0.001") == "3_loss=focal,optimizer.lr=0.001"
    assert job_dirname(0, "") == "0"
    assert job_dirname(1, "data.path=/data/my table.csv,logger=[csv,tensorboard]") == \
        "1_data.path=_data_my_table.csv,logger=_csv,tensorboard_"
    long = job_dirname(12, ",".join(f"key{i}=value{i}" for i in range(40)))
    assert len(long) == MAX_DIRNAME and long.startswith("12_key0=value0,")


def _job(sweep: Path, name: str, overrides: list[str], summary: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(summary))


def test_the_sweep_summary_lists_every_job_its_overrides_and_metrics(tmp_path):
    assert write_sweep_summary(tmp_path) is None  # no job yet
    done = {"status": "completed", "best_epoch": 4, "wall_time_s": 3.5}
    _job(tmp_path, "0_loss=focal,seed=1", ["loss=focal", "seed=1"],
         {**done, "metrics": {"val/nll": 0.30, "test/acc": 0.91, "train/loss": 0.2}})
    _job(tmp_path, "1_loss=focal,seed=2", ["loss=focal", "seed=2"],
         {**done, "metrics": {"val/nll": 0.25, "test/acc": 0.93, "train/loss": 0.1}})
    _job(tmp_path, "10_loss=poly1,seed=1", ["loss=poly1", "seed=1"], {"status": "diverged", "metrics": {}})
    _job(tmp_path, "2_loss=poly1,seed=2", ["loss=poly1", "seed=2"], None)  # still running, or killed
    (tmp_path / "multirun.yaml").write_text("not a job\n")

    csv_path, md_path = write_sweep_summary(tmp_path, optimized_metric="val/nll")
    table = pd.read_csv(csv_path)
    assert list(table["job"]) == ["0_loss=focal,seed=1", "1_loss=focal,seed=2", "2_loss=poly1,seed=2",
                                  "10_loss=poly1,seed=1"]  # in job order
    assert list(table.columns) == ["job", "status", "loss", "seed", "val/nll", "test/acc", "train/loss",
                                   "best_epoch", "wall_time_s"]
    assert list(table["status"]) == ["completed", "completed", "unfinished", "diverged"]
    assert list(table["test/acc"][:2]) == [0.91, 0.93] and table["test/acc"][2:].isna().all()
    markdown = md_path.read_text()
    assert "| job | status | loss | seed | val/nll | test/acc | best_epoch |" in markdown
    assert "| 1_loss=focal,seed=2 | completed | focal | 2 | 0.2500 | 0.9300 | 4 |" in markdown
    assert "Best by val/nll (min): 1_loss=focal,seed=2 (0.2500)" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left


def test_tables_are_plain_lines_when_stdout_is_not_a_terminal(capsys):
    path = "/a/very/long/path/" + "x" * 150 + "/checkpoints/epoch_007.ckpt"
    show_table("xentlit: final metrics", ("metric", "value"), [("test/acc", "0.9704"), ("best_checkpoint", path)])
    out = capsys.readouterr().out
    assert out.splitlines() == ["xentlit: final metrics", "metric           value", "test/acc         0.9704",
                                f"best_checkpoint  {path}"]


def test_the_model_summary_leaves_out_flops_that_were_not_measured(capsys):
    data = [(" ", ["0"]), ("Name", ["net"]), ("Type", ["MLP"]), ("Params", ["85.0 K"]), ("Mode", ["train"]),
            ("FLOPs", ["0"])]
    ModelSummary.summarize(data, 85_000, 85_000, 0.34, {"train": 27, "eval": 0}, total_flops=0)
    out = capsys.readouterr().out
    assert out.splitlines() == ["Model summary", "   Name  Type  Params  Mode", "0  net   MLP   85.0 K  train",
                                "Trainable params: 85.0 K", "Non-trainable params: 0", "Total params: 85.0 K",
                                "Total estimated model params size (MB): 0.340",
                                "Modules in train mode: 27, in eval mode: 0"]
    ModelSummary.summarize(data, 85_000, 85_000, 0.34, {"train": 27, "eval": 0}, total_flops=2_000_000)
    assert "Total FLOPs: 2.0 M" in capsys.readouterr().out


def test_ddp_children_rerun_the_command_with_the_users_config_dirs(tmp_path, monkeypatch):
    """Lightning's DDP child processes compose the same config: the same command, config folders and overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.conf import ConfigSourceInfo
    from omegaconf import open_dict

    from xentlit.config import register_configs
    from xentlit.entry import _job_subprocess_cmd

    register_configs()
    mine, more = tmp_path / "mine", tmp_path / "more"
    more.mkdir()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{more}]", "seed=3"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        source = ConfigSourceInfo(path=str(mine), schema="file", provider="command-line")  # what --config-dir adds
        cfg.hydra.runtime.config_sources.append(source)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # put back after the test
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(commands, "_running", "train")
    command, cwd = _job_subprocess_cmd(1)
    assert command[:4] == [sys.executable, "-m", "xentlit", "train"]
    assert command[4:8] == ["--config-dir", str(mine), f"hydra.searchpath=[file://{more}]", "seed=3"]
    assert f'hydra.run.dir="{tmp_path / "run"}"' in command and "hydra.job.name=train_rank1" in command
