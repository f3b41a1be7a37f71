"""Structured-config schemas for the YAML files in ``conf/``, generated from the classes' own signatures.

Each option file in ``conf/<group>/`` starts from one of these schemas (``defaults: [/schema/<group>/<name>]``),
so a misspelt key or a value of the wrong type fails when Hydra composes the config, before any data is
loaded. The schemas are built with hydra-zen from the constructors themselves: they cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra_zen import builds
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch import loggers as pl_loggers
from omegaconf import MISSING, OmegaConf

from xentlit import callbacks, checkpointing, console, data, losses, module, nets, plots
from xentlit import loggers as xentlit_loggers


def schema(
    target: Any, *, partial: bool = False, bases: tuple[type, ...] = (), exclude: tuple[str, ...] = (), **typed: Any
) -> type:
    """A dataclass schema of ``target``'s full signature.

    ``exclude`` names the arguments the training script supplies at run time (never a config file);
    ``typed`` pins ``name=(type, default)`` where the signature's own annotation is too loose to check.
    """
    node = builds(
        target,
        populate_full_signature=True,
        zen_partial=partial or None,
        zen_exclude=exclude,
        builds_bases=bases,
        # keyword-only fields: a subclass's required argument (FileDataModule's path) may follow its base's defaults
        zen_dataclass={"kw_only": True} if bases else None,
    )
    if partial:  # hydra-zen leaves a partial's required arguments out: add them back, to be set in YAML
        present = {f.name for f in dataclasses.fields(node)} | set(exclude) | set(typed)
        for name, param in inspect.signature(target).parameters.items():
            if name not in present and name != "self" and param.default is inspect.Parameter.empty:
                if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    typed[name] = (_PRIMITIVES.get(param.annotation, Any), MISSING)
    if not typed:
        return node
    fields = [(name, kind, field(default=default)) for name, (kind, default) in typed.items()]
    return dataclasses.make_dataclass(node.__name__, fields, bases=(node,))


# Annotations (also as strings, as `from __future__ import annotations` leaves them) that OmegaConf can check.
_PRIMITIVES: dict[Any, type] = {t: t for t in (int, float, str, bool)} | {t.__name__: t for t in (int, float, str, bool)}


@dataclass
class SchedulerConfig:
    """Lightning's lr-scheduler config; ``scheduler`` is a partial that takes the optimizer."""

    scheduler: Any = None
    interval: str = "epoch"
    frequency: int = 1
    monitor: str = "val/loss"
    strict: bool = True


def _scheduler_schema(target: Any) -> type:
    inner = schema(target, partial=True, exclude=("optimizer",))
    return dataclasses.make_dataclass(
        f"{target.__name__}Config", [("scheduler", inner, field(default_factory=inner))], bases=(SchedulerConfig,)
    )


@dataclass
class PathsConfig:
    """Where runs go. ``output_dir`` is the one run directory of this run (shared by every DDP rank)."""

    root_dir: str = "."
    log_dir: str = "outputs"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class MonitorConfig:
    """The validation metric that picks the best checkpoint, stops early and drives ``scheduler=plateau``.

    ``auto``: ``val/balanced_acc`` (max) when the loss rebalances classes (class weights, logit adjustment), whose
    own value would reward that trade rather than what is measured; otherwise ``val/nll`` (min), the plain
    cross-entropy of the predictions, whatever the training loss's smoothing or variant. ``mode: auto`` is max for
    accuracies and F1, min for losses.
    """

    metric: str = "auto"
    mode: str = "auto"


@dataclass
class TrainConfig:
    """The top level of ``conf/train.yaml``."""

    data: Any = None
    model: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    module: Any = None
    trainer: Any = None
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 42
    ignore_index: int = -100
    train: bool = True
    test: bool = True
    ckpt_path: str | None = None
    resume: str | None = None
    optimized_metric: str = "val/acc_best"
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    calibration: str = "temperature"
    threads: Optional[int] = 1
    trust_targets: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """The top level of ``conf/eval.yaml``."""

    trainer: Any = None
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "eval"
    ckpt_path: str = MISSING
    seed: int = 42
    logit_adjustment: float = 0.0
    threads: Optional[int] = 1
    trust_targets: list[str] = field(default_factory=list)


@dataclass
class PredictConfig:
    """The top level of ``conf/predict.yaml``."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "predict"
    ckpt_path: str = MISSING
    input: str = MISSING
    output: str = MISSING
    batch_size: int = 4096
    device: str = "cpu"
    logit_adjustment: float = 0.0
    threads: Optional[int] = 1
    trust_targets: list[str] = field(default_factory=list)


_tensorboard = getattr(pl_loggers, "TensorBoardLogger")
# The datamodules' shared options (their subclasses take them as **kwargs and pass them on).
_DATA_BASE = schema(data.TensorDataModule, exclude=("x", "y"))
# Likewise the loss variants and the base loss's options.
_LOSS_BASE = schema(losses.CrossEntropyLoss)

SCHEMAS: dict[str, dict[str, Any]] = {
    "data": {
        "digits": schema(data.DigitsDataModule, bases=(_DATA_BASE,)),
        "synthetic": schema(data.SyntheticDataModule, bases=(_DATA_BASE,)),
        "files": schema(data.FileDataModule, bases=(_DATA_BASE,)),
    },
    "model": {"mlp": schema(nets.MLP, exclude=("in_features", "num_classes", "categorical_cardinalities"))},
    "loss": {
        name: schema(cls, bases=(_LOSS_BASE,)) if cls is not losses.CrossEntropyLoss else _LOSS_BASE
        for name, cls in losses.LOSSES.items()
    },
    "module": {"xent": schema(module.XentModule, exclude=("net", "loss", "optimizer", "scheduler", "num_classes"))},
    "optimizer": {
        "sgd": schema(torch.optim.SGD, partial=True, exclude=("params",), lr=(float, 0.1)),
        "adam": schema(torch.optim.Adam, partial=True, exclude=("params",), lr=(float, 1e-3)),
        "adamw": schema(torch.optim.AdamW, partial=True, exclude=("params",), lr=(float, 1e-3)),
    },
    "scheduler": {
        "cosine": _scheduler_schema(torch.optim.lr_scheduler.CosineAnnealingLR),
        "step": _scheduler_schema(torch.optim.lr_scheduler.StepLR),
        "plateau": _scheduler_schema(torch.optim.lr_scheduler.ReduceLROnPlateau),
        "onecycle": _scheduler_schema(torch.optim.lr_scheduler.OneCycleLR),
    },
    "trainer": {"trainer": schema(pl.Trainer)},
    "logger": {
        "csv": schema(xentlit_loggers.CSVLogger),
        "tensorboard": schema(_tensorboard),
        "mlflow": schema(pl_loggers.MLFlowLogger),
        "wandb": schema(pl_loggers.WandbLogger, offline=(bool, False), entity=(Optional[str], None),
                        group=(Optional[str], None)),
    },
    "callbacks": {
        "model_checkpoint": schema(checkpointing.ModelCheckpoint),
        "early_stopping": schema(pl_callbacks.EarlyStopping),
        "rich_progress_bar": schema(console.ProgressBar),
        "tqdm_progress_bar": schema(pl_callbacks.TQDMProgressBar),
        "lr_monitor": schema(pl_callbacks.LearningRateMonitor),
        "plots": schema(plots.PlotCallback),
        "doctor": schema(callbacks.ConvergenceDoctor),
    },
}


def _run_id() -> str:
    """A short random id that keeps two runs started in the same second in separate directories."""
    return uuid.uuid4().hex[:6]


def register_configs() -> None:
    """Register the schemas (group ``schema/<group>``), the top-level schema and xentlit's resolvers."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="predict_schema", node=PredictConfig)
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            store.store(group=f"schema/{group}", name=name, node=node, package="_here_")
    if not OmegaConf.has_resolver("xentlit.run_id"):
        OmegaConf.register_new_resolver("xentlit.run_id", _run_id, use_cache=True)
    if not OmegaConf.has_resolver("xentlit.job_dirname"):
        from xentlit.sweeps import job_dirname

        OmegaConf.register_new_resolver("xentlit.job_dirname", job_dirname)
