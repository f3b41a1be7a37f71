"""The shape of a check: :class:`Check` (one finding code, the moments it judges), and :class:`Doctor`, what a
check may ask of the callback that runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from xentlit.callbacks.doctor.findings import Verdict
from xentlit.callbacks.doctor.observations import BatchStats, FirstStep, FitState, TrainEpoch, ValEpoch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor

C = TypeVar("C", bound="Check")

#: the moments at which checks are called, in the order of a fit (the hooks of :class:`Check`)
EVENTS = ("on_batch", "on_first_step", "on_class_counts", "on_step", "on_validation", "on_train_epoch",
          "on_fit_end", "on_exception")


class Settings(Protocol):
    """The :class:`~xentlit.callbacks.ConvergenceDoctor`'s arguments that the checks use."""

    window: int
    divergence_factor: float
    grad_explosion_factor: float
    max_input_scale: float
    max_preactivation: float
    keep_last_good: bool
    stop_on_divergence: bool


class Doctor(Protocol):
    """What a check may use of the fit it judges (the
    :class:`~xentlit.callbacks.doctor.examination.Examination` that calls it)."""

    trainer: pl.Trainer
    state: FitState
    settings: Settings

    def has(self, *codes: str) -> bool:
        """Whether any of ``codes`` has been reported in this fit."""

    def check(self, kind: type[C]) -> C:
        """The running instance of another check (to read its state)."""

    def halt(self, stop: bool) -> int | None:
        """Training diverged: with ``stop_on_divergence``, restore the last healthy weights, clear the optimiser
        state and (``stop``) stop training; the step the restored weights are from (``None``: none restored)."""

    def measure_weight_change(self) -> None:
        """Ask for the relative weight change over the next epoch (``record["weight_change"]``)."""


class Check:
    """One finding ``code`` with its ``severity`` and one-line ``title``, judged at the moments (``on_*``
    methods) a subclass overrides. A method returns a :class:`~xentlit.callbacks.doctor.findings.Verdict` (the
    message naming the fix, and the evidence) when the problem shows, else ``None``; each code is reported once
    per fit. A check keeps its own state on the instance (one per fit). ``local`` checks judge one rank's data
    (their findings are logged by the rank that saw them under DDP); the others judge values that are the same
    on every rank.

    Register a new check in :data:`xentlit.callbacks.doctor.checks.CHECKS`.
    """

    code: ClassVar[str]
    severity: ClassVar[str]
    title: ClassVar[str]
    local: ClassVar[bool] = False

    def on_batch(self, doctor: Doctor, batch: BatchStats) -> Verdict | None:
        """The first batch of each stage, and the batch that raised an exception (before the forward pass)."""

    def on_first_step(self, doctor: Doctor, first: FirstStep) -> Verdict | None:
        """The logits of the first training step."""

    def on_class_counts(self, doctor: Doctor, counts: Tensor, num_classes: int, source: str) -> Verdict | None:
        """The training split's class counts became known (from the datamodule, or counted in epoch 1)."""

    def on_step(self, doctor: Doctor, step: int, loss: float | None, grad_norm: float | None) -> Verdict | None:
        """Every optimiser step: its loss (the module's, this rank's) and, on the steps where it is measured,
        the gradient norm (the same on every rank)."""

    def on_validation(self, doctor: Doctor, val: ValEpoch) -> Verdict | None:
        """Each validation run (judged at the end of the training epoch, after the one collective)."""

    def on_train_epoch(self, doctor: Doctor, epoch: TrainEpoch) -> Verdict | None:
        """The end of each training epoch (``doctor.state.train_history[-1]`` is this epoch)."""

    def on_fit_end(self, doctor: Doctor) -> Verdict | None:
        """The end of ``fit`` (not called when it ends with an exception)."""

    def on_exception(self, doctor: Doctor, exception: BaseException, stage: str, step: int,
                     shown: list[str]) -> Verdict | None:
        """``fit`` raised: ``shown`` are the codes the failing batch shows."""


def learning_rates(trainer: pl.Trainer) -> list[float]:
    """The distinct learning rates of the trainer's optimisers, sorted."""
    return sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups if "lr" in g})


def class_names(trainer: pl.Trainer, indices: list[int]) -> str:
    """``"3 ('cat'), 5 ('dog')"`` with the datamodule's class names where it has meaningful ones, else ``"3, 5"``."""
    try:
        names: list[Any] = list(getattr(trainer.datamodule, "class_names", None) or [])
    except Exception:
        names = []
    if names and all(i < len(names) and names[i] != str(i) for i in indices):
        return ", ".join(f"{i} ({names[i]!r})" for i in indices)
    return ", ".join(str(i) for i in indices)
