"""Every shipped config option composes through Hydra and instantiates; schemas reject typos and bad types."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF
from xentlit.cli import resolve_monitor

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name not in {"hydra", "paths", "hparams_search"}  # a search file is not training's
}
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options]
NEEDS_CUDA = {("trainer", "gpu"), ("trainer", "ddp")}
NEEDS_PACKAGE = {("logger", "mlflow"): "mlflow", ("logger", "wandb"): "wandb"}


def test_groups_cover_the_swappable_parts():
    for group in ("data", "model", "loss", "module", "optimizer", "scheduler", "trainer", "logger", "callbacks"):
        assert GROUPS.get(group), f"conf/{group}/ has no options"
    assert {"sgd", "adam", "adamw"} <= set(GROUPS["optimizer"])
    assert {"none", "cosine", "step", "plateau", "onecycle"} <= set(GROUPS["scheduler"])
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(GROUPS["trainer"])
    assert {"csv", "tensorboard", "none"} <= set(GROUPS["logger"])


def _instantiate_option(cfg, group: str, option: str, tmp_path):
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    if group == "data":
        return instantiate(cfg.data)
    if group == "model":
        return instantiate(cfg.model, in_features=4, num_classes=3)
    if group == "loss":
        return instantiate(cfg.loss)
    if group == "module":
        return instantiate(cfg.module, net=net, num_classes=3)
    if group == "optimizer":
        return instantiate(cfg.optimizer)(net.parameters())
    if group == "scheduler":
        if not cfg.scheduler:
            return None
        node = instantiate(cfg.scheduler)
        kwargs = {"total_steps": 10} if option == "onecycle" else {}
        return node["scheduler"](optimizer, **kwargs)
    if group == "trainer":
        return instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    if group in {"logger", "callbacks"}:
        return [instantiate(entry) for entry in (cfg[group] or {}).values()]
    if group == "precision":
        return instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    if group in {"experiment", "debug", "launcher"}:
        return cfg
    raise AssertionError(f"no instantiation rule for group {group}")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes_and_instantiates(compose, group, option, tmp_path):
    if (group, option) in NEEDS_PACKAGE:
        pytest.importorskip(NEEDS_PACKAGE[group, option])
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}"]
    if (group, option) == ("data", "files"):
        csv = tmp_path / "data.csv"
        rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 3}" for i in range(60)]
        csv.write_text("\n".join(rows) + "\n")
        overrides.append(f"data.path={csv}")
    cfg = compose(*overrides)
    resolve_monitor(cfg, instantiate(cfg.loss))  # as the training script does before instantiating
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if (group, option) in NEEDS_CUDA and not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):
            _instantiate_option(cfg, group, option, tmp_path)
        return
    obj = _instantiate_option(cfg, group, option, tmp_path)
    if group == "optimizer":
        assert type(obj).__name__.lower() == option.replace("adamw", "adamw")
    if group == "loss":
        if obj.needs_class_counts:  # strategies fitted from the training labels (what the module's setup does)
            obj.set_class_counts(torch.tensor([30.0, 10.0, 2.0]))
        value = obj(torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0]))
        assert value.ndim == 0 and torch.isfinite(value)
    if group == "precision":
        # Lightning runs fp16 autocast as bf16 on a CPU (with a warning): there is no fp16 AMP there
        fp16 = "16-mixed" if torch.cuda.is_available() else "bf16-mixed"
        assert obj.precision == {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": fp16}[option]


def test_slurm_launcher_config_composes_with_the_submitit_plugin(compose):
    cfg = compose("launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp"


def test_default_config_is_digits_mlp_cross_entropy(compose, tmp_path):
    cfg = compose(f"paths.output_dir={tmp_path}")
    assert cfg.data._target_ == "xentlit.DigitsDataModule"
    assert cfg.model._target_ == "xentlit.MLP"
    assert cfg.loss._target_ == "xentlit.CrossEntropyLoss"
    assert cfg.loss.label_smoothing == 0.0 and cfg.loss.class_weights is None
    assert cfg.trainer.devices == 1
    assert set(cfg.logger) == {"csv"}
    assert {"model_checkpoint", "early_stopping", "rich_progress_bar"} <= set(cfg.callbacks)


def test_overrides_from_the_readme_compose(compose, tmp_path):
    cfg = compose("loss.label_smoothing=0.1", "loss.class_weights=balanced", "optimizer=adamw",
                  "optimizer.lr=3e-3", "trainer.max_epochs=20", f"paths.output_dir={tmp_path}")
    assert cfg.loss.label_smoothing == 0.1 and cfg.loss.class_weights == "balanced"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 3e-3
    assert cfg.trainer.max_epochs == 20


def test_several_loggers_and_callbacks_compose_together(compose, tmp_path):
    cfg = compose("logger=[csv,tensorboard]", "callbacks=[model_checkpoint,tqdm_progress_bar]",
                  f"paths.output_dir={tmp_path}")
    assert set(cfg.logger) == {"csv", "tensorboard"}
    assert set(cfg.callbacks) == {"model_checkpoint", "tqdm_progress_bar"}


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("loss.label_smothing=0.1", "label_smothing"),  # typo in a key
        ("optimizer.lr=fast", "lr"),  # wrong type
        ("trainer.max_epochs=ten", "max_epochs"),
        ("model.dropout=[1]", "dropout"),
        ("seed=abc", "seed"),
        ("data.batch_sise=3", "batch_sise"),
        ("callbacks.model_checkpoint.montor=x", "montor"),
    ],
)
def test_typos_and_wrong_types_fail_at_compose_time(compose, override, words):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as info:
        compose(override)
    message = str(info.value) + str(info.value.__cause__ or "")
    assert words in message


def test_unknown_option_names_the_valid_ones(compose):
    with pytest.raises(ConfigCompositionException) as info:
        compose("optimizer=adamm")
    message = str(info.value)
    assert "adamm" in message and "adamw" in message and "sgd" in message


@pytest.mark.parametrize(("overrides", "metric", "mode"), [
    ((), "val/nll", "min"),
    (("loss.label_smoothing=0.2",), "val/nll", "min"),
    (("loss.class_weights=balanced",), "val/balanced_acc", "max"),
    (("loss=class_balanced",), "val/balanced_acc", "max"),
    (("loss=logit_adjusted",), "val/balanced_acc", "max"),
    (("loss=logit_adjusted", "loss.tau=0"), "val/nll", "min"),
    (("monitor.metric=val/f1_macro",), "val/f1_macro", "max"),
    (("monitor.metric=val/loss",), "val/loss", "min"),
    (("monitor.metric=val/acc", "monitor.mode=min"), "val/acc", "min"),
])
def test_the_monitor_picks_checkpoints_stops_early_and_drives_plateau(compose, tmp_path, overrides, metric, mode):
    cfg = compose(*overrides, "scheduler=plateau", f"paths.output_dir={tmp_path}")
    resolve_monitor(cfg, instantiate(cfg.loss))
    checkpoint = instantiate(cfg.callbacks.model_checkpoint)
    stopping = instantiate(cfg.callbacks.early_stopping)
    assert (checkpoint.monitor, checkpoint.mode) == (metric, mode)
    assert (stopping.monitor, stopping.mode) == (metric, mode)
    assert cfg.scheduler.monitor == metric and cfg.scheduler.scheduler.mode == mode


def test_a_bad_monitor_mode_fails_at_start_up(compose, tmp_path):
    cfg = compose("monitor.mode=up", f"paths.output_dir={tmp_path}")
    with pytest.raises(ValueError, match="monitor.mode must be min, max or auto, got 'up'"):
        resolve_monitor(cfg, instantiate(cfg.loss))



def test_acc_best_is_maximised():
    cfg = OmegaConf.create({"monitor": {"metric": "val/acc_best", "mode": "auto"}})
    resolve_monitor(cfg, None)
    assert cfg.monitor.mode == "max"
