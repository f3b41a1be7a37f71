"""Lightning callbacks: :class:`ConvergenceDoctor`, which explains why a cross-entropy loss does not go down.

The doctor watches logits, targets, inputs, losses and gradient norms during ``Trainer.fit`` and records
*findings*: a stable ``code``, a severity, where it happened, the evidence numbers and a message that names a
concrete fix. It is cheap enough to leave on (on-device accumulation, no per-step host synchronisation on an
accelerator; the expensive checks run once) and works with any LightningModule that follows this contract:

* ``training_step`` and ``validation_step`` return a dict holding the batch's ``logits`` (``(N, C)`` or
  ``(N, C, d1, ...)``, raw scores, before any softmax) and ``target`` (class indices ``(N[, d1, ...])``, or
  probabilities shaped like the logits), next to the ``loss``. The key names are arguments
  (``logits_key``, ``target_key``, ``loss_key``). A step that returns something else is skipped by the
  logit/target checks; gradient checks still run. A training step that runs several optimiser steps
  (:class:`~xentlit.XentModule`'s ``steps_per_execution``) returns their rows concatenated and ``step_rows``, the
  rows of each optimiser step, so that per-batch statistics still count optimiser batches.
* For the checks made *before* the forward pass (first batch of each stage, and the batch that raised an
  exception), the doctor reads inputs and targets from the batch: through ``pl_module.unpack_batch(batch)`` when
  the module has one (:class:`~xentlit.XentModule` does), else ``batch[batch_input_key]`` /
  ``batch[batch_target_key]`` for a dict batch, else ``batch[0]`` / ``batch[1]``.
* The number of classes comes from the logits, or (before the first forward pass) from ``num_classes``, the
  module's ``num_classes`` attribute or the datamodule's; the ignore index from ``ignore_index`` or the module's
  ``ignore_index`` attribute (default -100). Training class counts come from the datamodule's ``class_counts``
  when it has them, else they are counted from the training targets.

Findings (code: severity, what it means):

========================== ======== ==================================================================
``softmax_before_loss``    error    outputs are probabilities (in [0, 1], rows sum to 1), not logits
``initial_loss``           warning  the untrained model's loss is far above that of uniform predictions
``target_out_of_range``    error    class indices outside ``[0, C)`` that are not the ignore index
``float_class_indices``    error    class indices stored as floats (shape ``(N,)``, whole numbers)
``float_one_hot_targets``  warning  float one-hot rows where class indices were meant
``integer_one_hot_targets`` error   integer one-hot rows ``(N, C)`` instead of class indices ``(N,)``
``unseen_class``           warning  a class never occurs among the training targets
``all_ignored_batch``      warning  training batches whose every target equals the ignore index
``non_finite_inputs``      error    NaN/inf in the inputs
``unscaled_inputs``        warning  feature scales so large that the first layer saturates
``divergence``             error    NaN/inf loss or gradients, or a loss/gradient norm that explodes
``lr_too_low``             warning  loss flat near its initial value while gradients are healthy
``majority_collapse``      warning  predictions concentrate on the majority class, macro-F1 at chance
``overconfidence``         warning  train loss falls while validation loss and overconfidence grow
========================== ======== ==================================================================

Each code is reported once per run: logged as a warning when found, written to ``diagnosis.json`` in
``trainer.default_root_dir`` (rank 0 only) and summarised on stdout at the end of ``fit`` (also when ``fit``
ends with an exception). The gradient norm and the mean max-probability of the training batches are logged
per epoch as ``doctor/grad_norm`` and ``doctor/max_prob``.

On divergence (``stop_on_divergence=True``) the doctor restores the weights of the last healthy epoch
boundary (kept as a CPU copy, or the initial weights during the first epoch), clears the optimiser's state
and sets ``trainer.should_stop``: training ends cleanly and every checkpoint Lightning writes afterwards holds
finite weights, while the checkpoints written before stay as they were.

Cost: per training step the doctor keeps references to the step's (already detached) logits and targets and
reads the loss scalar the module returned; the statistics are computed in chunks (once per epoch for small
problems, or whenever about ``chunk_size`` logits have accumulated), so the number of kernels per step stays
near zero and memory stays bounded. The gradient norm is computed on the first steps and then every
``trainer.log_every_n_steps`` steps. On CPU the per-step loss is read directly (no device to wait for); on
CUDA it is copied asynchronously into pinned memory and read one step later, so the host never waits for the
current step. Epoch statistics are all-reduced once per epoch (one collective, called on every rank), so DDP
cannot deadlock and every rank takes the same decisions. Expensive checks (first batches, initial loss) run
once.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from xentlit.atomic import write_atomic
from xentlit.console import say

__all__ = ["CODES", "DIAGNOSIS_FILE", "ConvergenceDoctor", "Finding"]

log = logging.getLogger(__name__)

DIAGNOSIS_FILE = "diagnosis.json"

#: Every finding code with its severity and a one-line title.
CODES: dict[str, tuple[str, str]] = {
    "softmax_before_loss": ("error", "probabilities passed to the loss instead of logits"),
    "initial_loss": ("warning", "initial loss far above that of an untrained model"),
    "target_out_of_range": ("error", "class indices outside [0, C)"),
    "float_class_indices": ("error", "class indices stored as floats"),
    "float_one_hot_targets": ("warning", "float one-hot targets where class indices were meant"),
    "integer_one_hot_targets": ("error", "integer one-hot targets instead of class indices"),
    "unseen_class": ("warning", "a class never seen in the training split"),
    "all_ignored_batch": ("warning", "training batches with every target ignored"),
    "non_finite_inputs": ("error", "NaN/inf in the inputs"),
    "unscaled_inputs": ("warning", "unnormalised inputs saturate the first layer"),
    "divergence": ("error", "training diverged"),
    "lr_too_low": ("warning", "learning rate too low"),
    "majority_collapse": ("warning", "predictions collapsed onto the majority class"),
    "overconfidence": ("warning", "overfitting: validation loss and overconfidence grow"),
}

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
_DIVERGENCE_TEXT = re.compile(r"non-finite|diverg|\bnan\b|\binf\b|overflow", re.IGNORECASE)
_N_BINS = 15  # calibration bins (as XentModule's default ECE)
_GRAD_REFERENCE_STEPS = 5
_TUNER_CALLBACKS = {"LearningRateFinder", "BatchSizeFinder", "_LRCallback"}
_LOCAL_CODES = {"float_class_indices", "float_one_hot_targets", "integer_one_hot_targets", "target_out_of_range",
                "non_finite_inputs", "softmax_before_loss", "initial_loss", "unscaled_inputs"}  # found on one rank


@dataclass
class Finding:
    """One diagnosis: a stable ``code``, its ``severity``, where it was found, the evidence and the fix."""

    code: str
    severity: str
    stage: str
    epoch: int
    step: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        where = f"epoch {self.epoch}, step {self.step}, {self.stage}"
        return f"[{self.severity}] {self.code} ({where}): {self.message}"


def _num(value: Any) -> Any:
    """A JSON-friendly, readable number (4 significant digits; NaN/inf as strings)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return float(f"{value:.4g}")


def _evidence(**values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            out[key] = [_num(v) for v in value]
        else:
            out[key] = _num(value)
    return out


def _flatten_classes(logits: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(N, C, d1, ...)`` logits -> ``(N*d1*..., C)``; targets follow (indices ``(M,)`` or probabilities
    ``(M, C)``), or ``None`` when their shape does not match the logits."""
    c = logits.shape[1]
    flat = logits.movedim(1, -1).reshape(-1, c) if logits.dim() > 2 else logits
    if target is None:
        return flat, None
    if target.is_floating_point() and target.dim() == logits.dim() and target.shape[1] == c and target.dim() > 1:
        soft = target.movedim(1, -1).reshape(-1, c) if target.dim() > 2 else target
        return flat, soft if soft.shape == flat.shape else None
    index = target.reshape(-1)
    return flat, index if index.numel() == flat.shape[0] else None


def _to_host(values: list[Tensor]) -> list[float]:
    """Scalars (possibly on several devices) as floats, with one device-to-host copy per device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for device, index in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        host = torch.stack([values[i].reshape(()).to(dtype) for i in index]).cpu().tolist()
        for i, v in zip(index, host):
            out[i] = v
    return out


class _StepReader:
    """Per-step scalars read without stalling the device.

    CPU: read at once (there is no device to wait for). CUDA: copied into pinned host memory with
    ``non_blocking=True`` and an event recorded; the next step waits on that (old) event only, so the host never
    waits for the current step, and every DDP rank reads the values of the same step (identical decisions, no
    deadlock). Other accelerators (MPS, XLA, ...): kept on the device and read together at :meth:`flush` (epoch
    boundaries), one synchronisation per epoch.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, Tensor, Any]] = []
        self._pinned: dict[int, list[Tensor]] = {}
        self._flip = 0

    def push(self, values: list[Tensor], tag: Any) -> list[tuple[Any, list[float]]]:
        """Queue this step's scalars; return the values that are now readable, as ``(tag, values)``."""
        device = values[0].device
        if device.type == "cpu":
            return [(tag, [float(v) for v in values])]
        vec = torch.stack([v.reshape(()).to(torch.float32) for v in values]) if len(values) > 1 else \
            values[0].reshape(1).to(torch.float32)
        if device.type != "cuda":
            self._pending.append((tag, vec, None))
            return []
        ready = self.flush()
        ring = self._pinned.get(vec.numel())
        if ring is None:
            ring = self._pinned[vec.numel()] = [torch.empty(vec.numel(), pin_memory=True) for _ in range(2)]
        self._flip ^= 1
        host = ring[self._flip]
        host.copy_(vec, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((tag, host, event))
        return ready

    def flush(self) -> list[tuple[Any, list[float]]]:
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        ready = []
        for tag, values, event in pending:
            if event is not None:
                event.synchronize()
            ready.append((tag, values.tolist()))
        return ready


class _Chunks:
    """References to detached ``(logits, target)`` pairs of several batches, reduced together.

    Memory is accounted in bytes of the storages kept alive (a view of a larger tensor keeps all of it).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.items: list[tuple[Tensor, Tensor]] = []
        self.held = 0

    def add(self, logits: Tensor, target: Tensor) -> bool:
        """Keep the pair; True when enough has accumulated to be reduced."""
        self.items.append((logits, target))
        self.held += logits.untyped_storage().nbytes() + target.untyped_storage().nbytes()
        return self.held >= self.limit

    def take(self) -> list[tuple[Tensor, Tensor]]:
        items, self.items, self.held = self.items, [], 0
        return items


class ConvergenceDoctor(Callback):
    """Detect and explain why a cross-entropy classifier does not train; see the module docstring.

    Args:
        logits_key, target_key, loss_key: keys of the dicts returned by ``training_step``/``validation_step``.
        batch_input_key, batch_target_key: keys of a dict batch, for modules without ``unpack_batch``.
        num_classes: number of classes, for the target checks made before the first forward pass (default:
            the module's or the datamodule's ``num_classes``; always the logits' width afterwards).
        ignore_index: ignored target value (default: the module's ``ignore_index``, else -100).
        stop_on_divergence: on divergence restore the last healthy weights, clear the optimiser state and stop.
        keep_last_good: keep a CPU copy of the weights at every healthy epoch boundary (what divergence
            restores, and what measures how far the weights move per epoch for ``lr_too_low``).
        divergence_factor: a batch loss above ``divergence_factor`` times the initial loss (at least that of
            uniform predictions) counts as divergence.
        grad_explosion_factor: a gradient norm above this multiple of the first steps' norm, two steps in a
            row, counts as divergence.
        max_input_scale: largest per-feature RMS of the inputs accepted without comment.
        max_preactivation: largest RMS of the first layer's outputs accepted without comment.
        window: epochs over which a flat loss (``lr_too_low``), persistent collapse (``majority_collapse``)
            and rising validation loss (``overconfidence``) are judged.
        chunk_size: how many logits (float32 elements' worth of memory, logits and targets together) are held
            before their statistics are computed: bounds the memory the doctor holds (16 MiB by default) and
            the number of kernels it launches.
        report_file: file name of the report in ``trainer.default_root_dir`` (None: no file).
        log_metrics: log ``doctor/grad_norm`` and ``doctor/max_prob`` once per epoch.
        verbose: log each finding as a warning when found and print the summary at the end of ``fit``.
    """

    def __init__(
        self,
        logits_key: str = "logits",
        target_key: str = "target",
        loss_key: str = "loss",
        batch_input_key: str = "x",
        batch_target_key: str = "y",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        stop_on_divergence: bool = True,
        keep_last_good: bool = True,
        divergence_factor: float = 10.0,
        grad_explosion_factor: float = 1000.0,
        max_input_scale: float = 100.0,
        max_preactivation: float = 30.0,
        window: int = 3,
        chunk_size: int = 1 << 22,
        report_file: str | None = DIAGNOSIS_FILE,
        log_metrics: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if window < 2:
            raise ValueError(f"window must be at least 2 epochs, got {window}")
        for name, value in (("divergence_factor", divergence_factor), ("grad_explosion_factor", grad_explosion_factor),
                            ("max_input_scale", max_input_scale), ("max_preactivation", max_preactivation)):
            if not value > 1.0:
                raise ValueError(f"{name} must be > 1, got {value}")
        self.logits_key = logits_key
        self.target_key = target_key
        self.loss_key = loss_key
        self.batch_input_key = batch_input_key
        self.batch_target_key = batch_target_key
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.stop_on_divergence = stop_on_divergence
        self.keep_last_good = keep_last_good
        self.divergence_factor = float(divergence_factor)
        self.grad_explosion_factor = float(grad_explosion_factor)
        self.max_input_scale = float(max_input_scale)
        self.max_preactivation = float(max_preactivation)
        self.window = int(window)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.report_file = report_file
        self.log_metrics = log_metrics
        self.verbose = verbose
        self.findings: list[Finding] = []
        self._reset()

    # ------------------------------------------------------------------------------------------ public API
    def report(self) -> dict[str, Any]:
        """The diagnosis as a JSON-serialisable dict (what ``diagnosis.json`` holds)."""
        findings = sorted(self.findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.step))
        return {
            "status": "problems_found" if findings else "ok",
            "stopped_on_divergence": self._stopped,
            "epochs_seen": self._epochs_seen,
            "steps_seen": self._steps_seen,
            "findings": [f.to_dict() for f in findings],
            "codes": [f.code for f in findings],
        }

    @property
    def history(self) -> dict[str, list[dict[str, float]]]:
        """Per-epoch statistics: ``train`` (NLL, module loss, mean max-probability, gradient norm, ...) and
        ``val`` (NLL, accuracy, confidence, ECE and its overconfident part, ...), reduced over ranks."""
        return {"train": list(self._train_history), "val": list(self._val_history)}

    @property
    def stopped_on_divergence(self) -> bool:
        """Whether this fit was stopped because training diverged (the last healthy weights were restored)."""
        return self._stopped

    def summary(self) -> str:
        """A readable multi-line summary of the findings."""
        if not self.findings:
            return (f"ConvergenceDoctor: no problems found ({self._epochs_seen} epochs, {self._steps_seen} steps "
                    "checked).")
        lines = [f"ConvergenceDoctor: {len(self.findings)} problem(s) found"]
        for f in sorted(self.findings, key=lambda f: (_SEVERITY_ORDER.get(f.severity, 9), f.step)):
            lines.append("  " + f.format())
            if f.evidence:
                lines.append("      evidence: " + ", ".join(f"{k}={v}" for k, v in f.evidence.items()))
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]

    # ------------------------------------------------------------------------------------------- state
    def _reset(self) -> None:
        self.findings = []
        self._active = False
        self._finished = False
        self._stopped = False
        self._epochs_seen = 0
        self._steps_seen = 0
        self._device: torch.device | None = None
        self._dtype = torch.float64
        self._num_classes: int | None = None
        self._ignore = -100
        self._checked_first: set[str] = set()
        self._last_batch: tuple[str, Any] | None = None
        self._batch_step = 0
        self._opt_steps = 0
        self._single = True
        self._measure_change = False
        self._step0_pending = True
        self._input_stats: dict[str, float] | None = None
        self._hooks: list[Any] = []
        self._first_layer: list[tuple[str, Tensor]] = []
        self._reader = _StepReader()
        # gradient norms
        self._grad_every = 10
        self._grad_norm: Tensor | None = None
        self._grad_measured = False
        self._grad_history: list[float] = []
        self._grad_reference: float | None = None
        self._explode_streak = 0
        # losses
        self._loss_reference: float | None = None
        self._loss_scale = 1.0
        self._loss_limit: float | None = None
        self._initial_nll: float | None = None
        self._last_loss: float | None = None
        self._module_loss0: float | None = None
        self._uniform_loss: float | None = None
        self._epoch_loss = [0.0, 0]
        self._epoch_grad = [0.0, 0, 0.0]
        # statistics (device tensors, reduced in chunks)
        self._train_chunks = _Chunks(4 * self.chunk_size)
        self._val_chunks = _Chunks(4 * self.chunk_size)
        self._train_stats: Tensor | None = None
        self._train_rows = [0, 0]  # rows and batches in _train_stats (known on the host)
        self._val_stats: Tensor | None = None
        self._val_pending: list[tuple[int, int, Tensor | None]] = []
        self._train_counts: list[float] | None = None
        self._dm_counts: Tensor | None = None
        # weights
        self._snapshot: list[Tensor] | None = None
        self._tensors: tuple[list[Tensor], int] | None = None
        self._snapshot_step = -1
        self._weight_change: float | None = None
        # histories and verdict state
        self._train_history: list[dict[str, float]] = []
        self._val_history: list[dict[str, float]] = []
        self._collapse_streak = 0
        self._last_collapse: dict[str, Any] | None = None
        self._warned_contract = False
        self._internal_errors: set[str] = set()
        self._detected: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING.value:
            return
        self._reset()
        tuners = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in _TUNER_CALLBACKS]
        if tuners:  # an lr / batch-size search diverges on purpose: nothing to diagnose
            if trainer.is_global_zero:
                log.info("ConvergenceDoctor is off for this fit: %s runs in it.", ", ".join(tuners))
            return
        self._active = True
        self._ignore = self._resolve_ignore_index(pl_module)

    # --------------------------------------------------------------------------------------- findings
    def _add(self, trainer: pl.Trainer | None, code: str, message: str, stage: str = "train",
             evidence: dict[str, Any] | None = None, step: int | None = None) -> Finding | None:
        self._detected.append(code)
        if any(f.code == code for f in self.findings):
            return None
        severity = CODES[code][0]
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        if step is None:
            step = int(trainer.global_step) if trainer is not None else 0
        finding = Finding(code, severity, stage, epoch, step, message, evidence or {})
        self.findings.append(finding)
        if self.verbose and trainer is not None:
            # Batch-level findings are this rank's own (and must be seen even if this rank then fails);
            # epoch-level ones are the same on every rank: rank 0 speaks for all.
            if code in _LOCAL_CODES and trainer.world_size > 1:
                log.warning("ConvergenceDoctor (rank %d) %s", trainer.global_rank, finding.format())
            elif trainer.is_global_zero:
                log.warning("ConvergenceDoctor %s", finding.format())
        return finding

    def _safely(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a rank-local check; a diagnostic must never break training (collectives are never guarded)."""
        try:
            return fn(*args)
        except Exception as err:
            if what not in self._internal_errors:
                self._internal_errors.add(what)
                log.warning("ConvergenceDoctor skipped %s: %s: %s", what, type(err).__name__, err)
            return None

    def _has(self, *codes: str) -> bool:
        return any(f.code in codes for f in self.findings)

    # ------------------------------------------------------------------------------ helpers: module/data
    def _resolve_ignore_index(self, pl_module: pl.LightningModule) -> int:
        if self.ignore_index is not None:
            return int(self.ignore_index)
        value = getattr(pl_module, "ignore_index", None)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else -100

    def _known_num_classes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        if self._num_classes is not None:
            return self._num_classes
        if self.num_classes is not None:
            return int(self.num_classes)
        for owner in (pl_module, getattr(pl_module, "hparams", None), getattr(trainer, "datamodule", None)):
            try:
                value = getattr(owner, "num_classes", None) if owner is not None else None
            except Exception:  # a datamodule property that cannot be computed
                value = None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return value
        return None

    def _unpack(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Any, Any]:
        fn = getattr(pl_module, "unpack_batch", None)
        if callable(fn):
            try:
                x, y = fn(batch)
                return x, y
            except Exception:
                pass
        if isinstance(batch, Mapping):
            return batch.get(self.batch_input_key), batch.get(self.batch_target_key)
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        return None, None

    def _outputs(self, outputs: Any) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not isinstance(outputs, Mapping):
            return None, None, outputs if isinstance(outputs, Tensor) else None
        logits, target, loss = (outputs.get(k) for k in (self.logits_key, self.target_key, self.loss_key))
        ok = isinstance(logits, Tensor) and logits.dim() >= 2 and isinstance(target, Tensor)
        if not ok:
            logits = target = None
        elif logits.requires_grad or target.requires_grad:
            logits, target = logits.detach(), target.detach()
        if not isinstance(loss, Tensor):
            loss = None
        elif loss.requires_grad:
            loss = loss.detach()
        return logits, target, loss

    def _warn_contract(self, trainer: pl.Trainer) -> None:
        if not self._warned_contract and trainer.is_global_zero:
            log.warning(
                "ConvergenceDoctor: the step output has no %r/%r tensors (see the callback's docstring for the "
                "contract); logit and target checks are skipped, gradient checks still run.",
                self.logits_key, self.target_key)
        self._warned_contract = True

    # ------------------------------------------------------------------------ checks on a raw batch
    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, stage: str) -> list[str]:
        """Input and target checks from the batch itself, before the forward pass (one host sync).

        Returns the codes this batch shows (also those already reported).
        """
        self._detected = []
        x, y = self._unpack(pl_module, batch)
        values: list[Tensor] = []
        layout: list[str] = []
        known: dict[str, float] = {}
        if isinstance(x, Tensor) and x.is_floating_point() and x.numel() > 0:
            xf = x.detach().float()
            xf = xf.reshape(xf.shape[0], -1) if xf.dim() > 1 else xf.reshape(-1, 1)
            finite = torch.isfinite(xf)
            xz = torch.where(finite, xf, torch.zeros((), device=xf.device))
            values += [(~finite).sum(), xz.abs().amax(), xz.pow(2).mean(0).sqrt().amax(), xz.mean(0).abs().amax()]
            layout += ["x_nonfinite", "x_abs_max", "x_feature_rms_max", "x_feature_mean_abs_max"]
            known["x_numel"] = float(xf.numel())
        target_kind = None
        if isinstance(y, Tensor) and y.numel() > 0 and not y.is_complex() and y.dtype != torch.bool:
            c = self._known_num_classes(trainer, pl_module)
            ignore = self._ignore
            yd = y.detach()
            dev = yd.device
            if yd.is_floating_point():
                finite_y = torch.isfinite(yd)
                yz = torch.where(finite_y, yd, torch.zeros((), device=dev, dtype=yd.dtype))
                whole = (yz == yz.round()).all() & finite_y.all()
                if yd.dim() == 1:
                    target_kind = "float_1d"
                    values += [whole, yz.amin(), yz.amax()]
                    layout += ["y_whole", "y_min", "y_max"]
                elif yd.dim() == 2 and yd.shape[1] >= 2:
                    target_kind = "float_2d"
                    binary = ((yz == 0) | (yz == 1)).all()
                    one_hot = binary & (yz.sum(1) == 1).all()
                    values += [one_hot]
                    layout += ["y_one_hot"]
                    known["y_width"] = float(yd.shape[1])
            else:
                yl = yd.long()
                valid = yl != ignore
                target_kind = "index"
                n_valid = valid.sum()
                if c is not None:
                    bad = valid & ((yl < 0) | (yl >= c))
                else:
                    bad = valid & (yl < 0)
                big = torch.iinfo(torch.long).max
                vmin = torch.where(valid, yl, big).amin()
                vmax = torch.where(valid, yl, -big).amax()
                values += [bad.sum(), n_valid, vmin, vmax]
                layout += ["y_bad", "y_valid", "y_min", "y_max"]
                if yl.dim() == 2 and yl.shape[1] >= 2 and (c is None or yl.shape[1] == c):
                    binary = ((yl == 0) | (yl == 1)).all()
                    values += [binary & (yl.sum(1) == 1).all()]
                    layout += ["y_one_hot"]
        if not values:
            return []
        host = {**dict(zip(layout, _to_host(values))), **known}
        if stage == "train" and "x_numel" in host:
            self._input_stats = host
        self._judge_inputs(trainer, host, stage)
        if target_kind is not None:
            self._judge_targets(trainer, pl_module, host, target_kind, y, stage)
        return list(self._detected)

    def _judge_inputs(self, trainer: pl.Trainer, host: dict[str, float], stage: str) -> None:
        if host.get("x_nonfinite", 0) > 0:
            n, total = int(host["x_nonfinite"]), int(host["x_numel"])
            self._add(trainer, "non_finite_inputs", stage=stage, evidence=_evidence(
                non_finite_values=n, values_in_batch=total, fraction=n / max(total, 1)), message=(
                f"{n} of {total} input values in a {stage} batch are NaN or inf: every logit, loss and gradient "
                "they touch becomes NaN, which looks like divergence but is a data problem. Fix: find and drop "
                "or impute the missing values before training (e.g. torch.nan_to_num, or fill with the training "
                "mean), and check the feature pipeline for divisions by zero or log(0)."))

    def _judge_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule, host: dict[str, float],
                       kind: str, y: Tensor, stage: str) -> None:
        c = self._known_num_classes(trainer, pl_module)
        ignore = self._ignore
        shape = list(y.shape)
        if kind == "float_1d" and host["y_whole"] > 0:
            self._add(trainer, "float_class_indices", stage=stage, evidence=_evidence(
                dtype=str(y.dtype), shape=shape, min=host["y_min"], max=host["y_max"]), message=(
                f"The {stage} targets are class indices stored as {y.dtype} (shape {shape}, whole numbers "
                f"{host['y_min']:g}..{host['y_max']:g}): cross-entropy reads float targets as probabilities, "
                "so a float vector of indices is rejected (or misread). Fix: convert the labels to int64 "
                "class indices in the dataset (y.long()), not float."))
        elif kind == "float_2d" and host["y_one_hot"] > 0:
            width = int(host["y_width"])
            self._add(trainer, "float_one_hot_targets", stage=stage, evidence=_evidence(
                dtype=str(y.dtype), shape=shape, width=width), message=(
                f"The {stage} targets are float one-hot rows (shape {shape}, dtype {y.dtype}) where class "
                "indices were meant: the loss treats them as probability targets, so ignore_index cannot mark "
                "unlabeled rows, class weights are normalised per row instead of by the weight sum, and the "
                f"targets take {width}x the memory. Fix: pass int64 class indices (y.argmax(dim=1)), and keep "
                "float targets for genuinely soft labels (label smoothing is an option of the loss)."))
        elif kind == "index":
            if host.get("y_one_hot", 0) > 0:
                self._add(trainer, "integer_one_hot_targets", stage=stage, evidence=_evidence(
                    dtype=str(y.dtype), shape=shape), message=(
                    f"The {stage} targets are integer one-hot rows (shape {shape}) instead of class indices "
                    f"of shape ({shape[0]},): cross-entropy reads each 0/1 entry as a class index. Fix: pass "
                    "y.argmax(dim=1) (int64 class indices)."))
            elif host["y_bad"] > 0:
                vmin, vmax = int(host["y_min"]), int(host["y_max"])
                if c is not None and vmin >= 1 and vmax == c:
                    hint = (f"the labels look 1-based ({vmin}..{vmax}) while classes are numbered 0..{c - 1}: "
                            "subtract 1 from every label")
                elif vmin < 0:
                    hint = (f"negative labels (smallest {vmin}) are not the ignore_index ({ignore}): mark "
                            f"unlabeled rows with ignore_index={ignore}, or set ignore_index={vmin}")
                else:
                    hint = (f"the model has {c} outputs but the labels go up to {vmax}: build the network with "
                            f"num_classes={vmax + 1} (or remap the labels to 0..{c - 1})")
                self._add(trainer, "target_out_of_range", stage=stage, evidence=_evidence(
                    bad_targets=int(host["y_bad"]), labelled_targets=int(host["y_valid"]), min=vmin, max=vmax,
                    num_classes=c if c is not None else "unknown", ignore_index=ignore), message=(
                    f"{int(host['y_bad'])} of {int(host['y_valid'])} {stage} targets are outside [0, "
                    f"{c if c is not None else 'C'}) and not the ignore_index ({ignore}): cross-entropy fails on "
                    f"them (on a GPU with an opaque device-side assert). Fix: {hint}."))

    # ---------------------------------------------------------------------------- first-layer probe
    def _install_probe(self, pl_module: pl.LightningModule) -> None:
        """Forward hooks (first training batch only) that find the first layer with weights to run."""
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in pl_module.modules()):
            return  # hooks would force a recompilation of a compiled module
        self._first_layer = []

        def hook(name: str):
            def fn(module: nn.Module, args: Any, output: Any) -> None:
                if self._first_layer:
                    return
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(out, Tensor) and out.is_floating_point() and out.numel() > 0:
                    o = out.detach().float()
                    o = torch.where(torch.isfinite(o), o, torch.zeros((), device=o.device))
                    self._first_layer.append((name, o.pow(2).mean().sqrt()))
            return fn

        for name, module in pl_module.named_modules():
            if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
                self._hooks.append(module.register_forward_hook(hook(name)))

    def _remove_probe(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------ fit lifecycle
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._device = pl_module.device
        self._dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._grad_every = max(int(getattr(trainer, "log_every_n_steps", 10) or 10), 1)
        self._opt_steps = int(trainer.global_step)
        self._single = trainer.world_size == 1
        counts = None
        try:
            dm_counts = getattr(trainer.datamodule, "class_counts", None) if trainer.datamodule is not None else None
            if dm_counts is not None:
                counts = torch.as_tensor(dm_counts, dtype=torch.float64).flatten().cpu()
        except Exception:
            counts = None
        self._dm_counts = counts
        if self.keep_last_good:
            self._take_snapshot(trainer, pl_module, check=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._train_chunks.take()
        self._train_stats = None
        self._train_rows = [0, 0]
        self._epoch_loss = [0.0, 0]
        self._epoch_grad = [0.0, 0, 0.0]
        self._grad_measured = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._active:
            return
        self._last_batch = ("train", batch)
        self._batch_step = self._opt_steps
        if self._step0_pending and "train" not in self._checked_first:
            self._checked_first.add("train")
            self._safely("the first training batch's checks", self._check_batch, trainer, pl_module, batch, "train")
            self._safely("the first-layer probe", self._install_probe, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._active:
            return
        step = self._opt_steps
        self._opt_steps += 1
        if step >= _GRAD_REFERENCE_STEPS and step % self._grad_every and self._grad_measured:
            # (measured on the first steps, the first step of every epoch, then every n steps)
            self._watch_execution_step(trainer, pl_module, step)
            return
        self._grad_measured = True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None and not p.grad.is_sparse]
        if grads:
            first = grads[0]
            if all(g.device == first.device and g.dtype == first.dtype for g in grads):
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            else:
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
            self._grad_norm = norm if self._grad_norm is None else torch.hypot(self._grad_norm, norm)
        self._watch_execution_step(trainer, pl_module, step)

    def _watch_execution_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Inside a training step that runs several optimiser steps (XentModule's ``steps_per_execution``), judge
        each step's loss (the module's ``step_loss``) before the optimiser applies it: a divergence stops the
        execution (the module checks ``trainer.should_stop``) and the step is skipped (its gradients dropped)."""
        loss = getattr(pl_module, "step_loss", None)
        if not isinstance(loss, Tensor):
            return
        values, gn = [loss.reshape(())], self._grad_norm
        if gn is not None:
            self._grad_norm = None
            values.append(gn)
        self._watch(trainer, pl_module, self._reader.push(values, (step, True, gn is not None)))
        if self._stopped:
            for group in trainer.optimizers[0].param_groups if trainer.optimizers else []:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active:
            return
        self._steps_seen += 1
        logits, target, loss = self._outputs(outputs)
        if self._step0_pending:
            self._step0_pending = False
            try:
                if logits is not None:
                    self._safely("the first step's checks", self._first_step_checks, trainer, pl_module, logits,
                                 target)
                else:
                    self._warn_contract(trainer)
            finally:
                self._remove_probe()
        if logits is not None and target is not None:
            rows = outputs.get("step_rows") if isinstance(outputs, Mapping) else None
            pieces = zip(logits.split(list(rows)), target.split(list(rows))) if rows else [(logits, target)]
            if any([self._train_chunks.add(lg, t) for lg, t in pieces]):
                self._reduce_train_chunks()
        if isinstance(outputs, Mapping) and outputs.get("step_rows"):
            return  # each optimiser step's loss and gradient norm were judged in on_before_optimizer_step
        values: list[Tensor] = []
        if loss is not None and loss.numel() == 1:
            values.append(loss)
        gn = self._grad_norm
        if gn is not None:
            self._grad_norm = None
            values.append(gn)
        if values:
            tag = (self._batch_step, loss is not None and loss.numel() == 1, gn is not None)
            self._watch(trainer, pl_module, self._reader.push(values, tag))

    # ---------------------------------------------------------------------- statistics, in chunks (device)
    def _reduce_train_chunks(self) -> None:
        items = self._train_chunks.take()
        if not items:
            return
        result = self._safely("the training statistics", self._train_chunk_stats, items)
        if result is None:
            return
        stats, rows, batches = result
        self._train_rows[0] += rows
        self._train_rows[1] += batches
        if self._train_stats is None or self._train_stats.shape != stats.shape:
            self._train_stats = stats
        else:
            self._train_stats = self._train_stats + stats

    def _flatten_items(self, items: list[tuple[Tensor, Tensor]]
                       ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]] | None:
        """The chunk's logits ``(M, C)`` and targets concatenated, and the batches kept (same C, same kind)."""
        c = items[0][0].shape[1]
        soft = None
        kept, flat = [], []
        for lg, t in items:
            f_lg, f_t = _flatten_classes(lg, t)
            if f_t is None or f_lg.shape[1] != c:
                continue
            is_soft = f_t.is_floating_point() and f_t.dim() == 2
            if soft is None:
                soft = is_soft
            if is_soft != soft:
                continue
            kept.append((lg, t))
            flat.append((f_lg, f_t))
        if not flat:
            return None
        if len(flat) == 1:
            return flat[0][0], flat[0][1], kept
        return torch.cat([lg for lg, _ in flat]), torch.cat([t for _, t in flat]), kept

    def _valid_targets(self, t: Tensor, c: int) -> tuple[Tensor, Tensor]:
        """``(valid, safe)``: which index targets count, and the targets with every other one set to ``c``
        (out of range: ``bincount``'s spill bin, never equal to a prediction)."""
        tl = t.long()
        valid = tl.clamp(0, c - 1) == tl
        if 0 <= self._ignore < c:  # (a negative ignore_index, the usual one, is already out of range)
            valid &= tl != self._ignore
        return valid, torch.where(valid, tl, c)

    @staticmethod
    def _log_partition(x: Tensor, with_argmax: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(logsumexp, 1 / sum(exp(x - max)), argmax)`` per row; ``1 / sum(...)`` is the max probability.

        Built from max, one exp and a sum instead of ``log_softmax``, whose CPU kernel is about ten times
        slower over a short class dimension, and without materialising the (N, C) log-probabilities.
        """
        if with_argmax:
            top, arg = x.max(dim=1, keepdim=True)
        else:
            top, arg = x.amax(dim=1, keepdim=True), None
        total = (x - top).exp().sum(dim=1)
        return total.log() + top.squeeze(1), total.reciprocal(), (arg.squeeze(1) if arg is not None else None)

    @staticmethod
    def _nll_sum(x: Tensor, lse: Tensor, t: Tensor, valid: Tensor | None, safe: Tensor | None) -> Tensor:
        """Summed negative log-likelihood of index targets (``valid``/``safe``) or of probability targets."""
        if valid is None or safe is None:
            return (t.float() * (lse.unsqueeze(1) - x)).where(t > 0, 0.0).sum()
        picked = x.gather(1, safe.clamp_max(x.shape[1] - 1).unsqueeze(1)).squeeze(1)
        return torch.where(valid, lse - picked, 0.0).sum()

    def _train_chunk_stats(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, int, int] | None:
        """``[nll_sum, labelled, max_prob_sum, all_ignored_batches, counts (C)]`` of a chunk, its rows and batches."""
        flat = self._flatten_items(items)
        if flat is None:
            return None
        lg, t, items = flat
        c = lg.shape[1]
        x = lg.float()
        lse, maxprob, _ = self._log_partition(x)
        if t.is_floating_point() and t.shape == x.shape:
            nll_sum = self._nll_sum(x, lse, t, None, None)
            n_valid = x.new_full((), float(t.shape[0]))
            counts = t.float().sum(dim=0)
            all_ignored = x.new_zeros(())
        else:
            valid, safe = self._valid_targets(t, c)
            nll_sum = self._nll_sum(x, lse, t, valid, safe)
            n_valid = valid.sum()
            counts = torch.bincount(safe, minlength=c + 1)[:c]
            all_ignored = self._count_all_ignored(items, valid)
        head = torch.stack([nll_sum, n_valid.to(x.dtype), maxprob.sum(), all_ignored.to(x.dtype)])
        return torch.cat([head, counts.to(x.dtype)]).to(self._dtype), x.shape[0], len(items)

    @staticmethod
    def _count_all_ignored(items: list[tuple[Tensor, Tensor]], valid: Tensor) -> Tensor:
        """Number of batches in the chunk without a labelled target (runs of equally sized batches at once)."""
        sizes = [t.numel() for _, t in items]
        total = valid.new_zeros((), dtype=torch.long)
        start = i = 0
        while i < len(sizes):
            j = i
            while j + 1 < len(sizes) and sizes[j + 1] == sizes[i]:
                j += 1
            k, size = j - i + 1, sizes[i]
            if size:
                total = total + (~valid[start:start + k * size].view(k, size).any(dim=1)).sum()
            start += k * size
            i = j + 1
        return total

    def _eval_stats(self, items: list[tuple[Tensor, Tensor]]) -> Tensor | None:
        """Validation statistics of a chunk as one vector (summed over chunks and ranks): ``[nll_sum, labelled,
        correct, confidence_sum]``, then per confidence bin count/confidence/correct, then per class TP,
        predictions and targets."""
        flat = self._flatten_items(items)
        if flat is None:
            return None
        lg, t, _ = flat
        c = lg.shape[1]
        x = lg.float()
        lse, conf, pred = self._log_partition(x, with_argmax=True)
        assert pred is not None
        if t.is_floating_point() and t.shape == x.shape:
            safe = t.argmax(dim=1)
            valid = torch.ones_like(safe, dtype=torch.bool)
            nll_sum = self._nll_sum(x, lse, t, None, None)
        else:
            valid, safe = self._valid_targets(t, c)  # invalid targets are c: never equal to a prediction
            nll_sum = self._nll_sum(x, lse, t, valid, safe)
        vf = valid.to(x.dtype)
        hit = pred == safe
        correct = hit.to(x.dtype)
        conf_v = conf * vf
        bins = (conf * _N_BINS).long().clamp_max(_N_BINS - 1)
        calib = x.new_zeros(3, _N_BINS).index_add_(1, bins, torch.stack([vf, conf_v, correct]))
        spill = torch.full_like(safe, c)
        index = torch.stack([torch.where(hit, safe, spill), torch.where(valid, pred, spill) + (c + 1),
                             safe + 2 * (c + 1)])
        counts = torch.bincount(index.flatten(), minlength=3 * (c + 1)).view(3, c + 1)[:, :c]
        head = torch.stack([nll_sum, vf.sum(), correct.sum(), conf_v.sum()])
        return torch.cat([head, calib.flatten(), counts.flatten().to(x.dtype)]).to(self._dtype)

    # ---------------------------------------------------------------------------- first training step
    def _first_step_checks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logits: Tensor,
                           target: Tensor | None) -> None:
        lg, t = _flatten_classes(logits, target)
        c = lg.shape[1]
        self._num_classes = c
        lgf = lg.float()
        finite = torch.isfinite(lgf).all()
        row_dev = (lgf.sum(dim=1) - 1.0).abs().amax()
        spread = lgf.std(dim=1).mean() if c > 1 else torch.zeros((), device=lgf.device)
        values = [lgf.amin(), lgf.amax(), row_dev, spread, finite]
        names = ["min", "max", "row_dev", "spread", "finite"]
        first = self._train_chunk_stats([(logits, target)]) if target is not None else None
        if first is not None:
            values += [first[0][0].float(), first[0][1].float()]
            names += ["nll_sum", "n_valid"]
        observed, expected = self._module_losses(pl_module, logits, target)
        if observed is not None and expected is not None:
            values += [observed.float().reshape(()), expected.float().reshape(())]
            names += ["module_loss", "module_uniform_loss"]
        if self._first_layer:
            values.append(self._first_layer[0][1].float())
            names.append("first_layer_rms")
        host = dict(zip(names, _to_host(values)))
        ln_c = math.log(c)

        # 1. probabilities instead of logits
        if c >= 2 and host["min"] >= -1e-6 and host["max"] <= 1 + 1e-6 and host["row_dev"] <= 1e-3:
            floor = math.log(c - 1 + math.e) - 1.0  # the loss of one-hot "logits": the best it can do
            self._add(trainer, "softmax_before_loss", step=self._batch_step, evidence=_evidence(
                output_min=host["min"], output_max=host["max"], max_row_sum_deviation=host["row_dev"],
                num_classes=c, loss_floor=floor), message=(
                f"The model's outputs are probabilities, not logits: every value lies in [0, 1] "
                f"(min {host['min']:.3g}, max {host['max']:.3g}) and every row sums to 1. Cross-entropy applies "
                "log-softmax itself, so a softmax before it squashes the logits into [0, 1]: the loss can never "
                f"go below ln(C - 1 + e) - 1 = {floor:.3g} (C={c}) and the gradients vanish. Fix: return raw "
                "logits from forward()/the last layer (remove the final softmax / nn.Softmax); apply softmax only "
                "at prediction time."))

        # 2. initial loss
        nll0 = host["nll_sum"] / host["n_valid"] if host.get("n_valid", 0) > 0 else None
        if nll0 is not None and math.isfinite(nll0):
            self._initial_nll = nll0
        observed_loss = host.get("module_loss", nll0)
        expected_loss = host.get("module_uniform_loss", ln_c)
        if observed_loss is not None and math.isfinite(observed_loss) and observed_loss > 0:
            self._module_loss0 = observed_loss
        self._uniform_loss = expected_loss if math.isfinite(expected_loss) else ln_c
        if observed_loss is not None and math.isfinite(expected_loss) and not self._has("softmax_before_loss"):
            tolerance = max(1.0, 0.5 * abs(expected_loss))
            if not math.isfinite(observed_loss) or observed_loss > expected_loss + tolerance:
                self._add(trainer, "initial_loss", step=self._batch_step, evidence=_evidence(
                    initial_loss=observed_loss, expected_loss=expected_loss, ln_num_classes=ln_c,
                    logit_std=host["spread"], logit_min=host["min"], logit_max=host["max"]), message=(
                    f"The initial loss is {observed_loss:.4g}, far above {expected_loss:.4g}, the loss of uniform "
                    f"predictions for this loss and batch (ln C = {ln_c:.4g} for C={c}, with its label smoothing "
                    f"and class weights): the untrained model is already confidently wrong (logits spread "
                    f"{host['spread']:.3g} per row, in [{host['min']:.3g}, {host['max']:.3g}]). Fix: initialise "
                    "the output layer with small weights and a zero bias, make sure nothing scales the logits "
                    "(a temperature below 1, an extra multiplication), and normalise the inputs."))

        # 4b. unnormalised inputs (needs the first layer's response)
        stats = self._input_stats
        if stats is not None and stats.get("x_nonfinite", 0) == 0:
            scale = stats["x_feature_rms_max"]
            layer = self._first_layer[0][0] if self._first_layer else None
            preact = host.get("first_layer_rms")
            if preact is not None:
                fire = preact > self.max_preactivation and scale > 10.0
            else:
                fire = scale > self.max_input_scale
            if fire:
                where = (f"the first layer ({layer}) outputs values of RMS {preact:.3g}" if preact is not None
                         else "the first layer receives them as they are")
                self._add(trainer, "unscaled_inputs", step=self._batch_step, evidence=_evidence(
                    input_feature_rms_max=scale, input_abs_max=stats["x_abs_max"],
                    input_feature_mean_abs_max=stats["x_feature_mean_abs_max"], first_layer=layer or "unknown",
                    first_layer_output_rms=preact if preact is not None else "unknown"), message=(
                    f"The inputs are not normalised: features reach an RMS of {scale:.3g} (largest |x| "
                    f"{stats['x_abs_max']:.3g}) and {where}, so tanh/sigmoid units saturate, ReLU units die and "
                    "the logits start huge. Fix: standardise the features with training-split statistics "
                    "((x - mean) / std; xentlit's data modules do it with standardize=True), or put a "
                    "normalisation layer (BatchNorm1d/LayerNorm) first."))

        # 3b. unseen classes, from the datamodule's counts
        if self._dm_counts is not None:
            self._judge_unseen(trainer, self._dm_counts, c, source="datamodule.class_counts")

    def _module_losses(self, pl_module: pl.LightningModule, logits: Tensor,
                       target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """The module's own loss on these logits and on uniform logits (label smoothing, weights included)."""
        if target is None:
            return None, None

        def mean_of(result: Any) -> Tensor | None:
            if isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Tensor) for r in result):
                total, denominator = result
                return total / denominator.clamp_min(1e-12) if denominator.numel() == 1 else None
            return result if isinstance(result, Tensor) and result.numel() == 1 else None

        candidates = []
        fn = getattr(pl_module, "compute_loss", None)
        if callable(fn):
            candidates.append(fn)
        for name in ("loss", "criterion", "loss_fn"):
            attr = getattr(pl_module, name, None)
            if isinstance(attr, nn.Module):
                candidates.append(attr)
        for fn in candidates:
            try:
                with torch.no_grad():
                    observed = mean_of(fn(logits, target))
                    expected = mean_of(fn(torch.zeros_like(logits), target))
            except Exception:
                continue
            if observed is not None and expected is not None:
                return observed.detach(), expected.detach()
        return None, None

    def _judge_unseen(self, trainer: pl.Trainer, counts: Tensor, c: int, source: str) -> None:
        counts = counts.double().flatten().cpu()
        if counts.numel() < c:
            counts = torch.cat([counts, counts.new_zeros(c - counts.numel())])
        counts = counts[:c]
        if counts.sum() <= 0:
            return
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            names = self._class_names(trainer, missing)
            self._add(trainer, "unseen_class", evidence=_evidence(
                unseen_classes=missing, class_counts=counts.tolist(), num_classes=c, source=source), message=(
                f"Class(es) {names} never occur among the training targets (counts from {source}: "
                f"{[int(v) for v in counts.tolist()]}), but the model has {c} outputs: it can only learn never to "
                "predict them (their recall will be 0) and class-weight strategies give them the largest "
                "weight. Fix: check the label mapping and the split (stratify it), add examples of these "
                "classes, or drop them from num_classes/class_names."))

    @staticmethod
    def _class_names(trainer: pl.Trainer, indices: list[int]) -> str:
        try:
            names = list(getattr(trainer.datamodule, "class_names", None) or [])
        except Exception:
            names = []
        if names and all(i < len(names) and names[i] != str(i) for i in indices):
            return ", ".join(f"{i} ({names[i]!r})" for i in indices)
        return ", ".join(str(i) for i in indices)

    # ------------------------------------------------------------------------------ divergence watch
    def _watch(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
               ready: list[tuple[Any, list[float]]]) -> None:
        """Judge the per-step loss and gradient norm of the steps whose values are readable now."""
        for (step, has_loss, has_gn), values in ready:
            if self._stopped:
                return
            loss = values[0] if has_loss else None
            if loss is not None:
                self._epoch_loss[0] += loss
                self._epoch_loss[1] += 1
            if not has_gn and loss is not None and self._loss_limit is not None and loss <= self._loss_limit:
                self._last_loss = loss  # the common case: a finite loss below the divergence limit
                continue
            gn = values[-1] if has_gn else None
            single = self._single  # a per-rank loss may only stop a single process
            reason = None
            evidence: dict[str, Any] = {"at_step": step}
            if loss is not None:
                evidence["batch_loss"] = loss
                if math.isfinite(loss):
                    self._last_loss = loss
                    if self._loss_reference is None:
                        scale = loss / self._module_loss0 if self._module_loss0 else 1.0
                        uniform = self._uniform_loss if self._uniform_loss is not None else 0.0
                        self._loss_scale = scale
                        self._loss_reference = max(loss, scale * uniform)
                        self._loss_limit = (max(self.divergence_factor * self._loss_reference,
                                                self._loss_reference + 10.0 * scale) if self._single else math.inf)
                elif single:
                    reason = "the training loss became NaN/inf"
            if gn is not None:
                evidence["grad_norm"] = gn
                if math.isfinite(gn):
                    self._epoch_grad[0] += gn
                    self._epoch_grad[1] += 1
                    self._epoch_grad[2] = max(self._epoch_grad[2], gn)
                    if len(self._grad_history) < _GRAD_REFERENCE_STEPS:
                        # the reference: median norm of the first measurements (provisional until there are 5)
                        self._grad_history.append(gn)
                        ordered = sorted(self._grad_history)
                        self._grad_reference = ordered[(len(ordered) - 1) // 2]
                    if self._grad_reference and gn > self.grad_explosion_factor * self._grad_reference:
                        self._explode_streak += 1
                        if self._explode_streak >= 2 and reason is None:
                            reason = (f"the gradient norm exploded to {gn:.4g}, {gn / self._grad_reference:.3g}x "
                                      f"its value in the first steps ({self._grad_reference:.4g})")
                            evidence["reference_grad_norm"] = self._grad_reference
                    else:
                        self._explode_streak = 0
                elif getattr(trainer.precision_plugin, "scaler", None) is None and reason is None:
                    reason = "the gradient norm became NaN/inf"  # (a GradScaler skips such steps itself)
            if (reason is None and single and loss is not None and math.isfinite(loss)
                    and self._loss_limit is not None):
                if loss > self._loss_limit:
                    reason = (f"the batch loss ({loss:.4g}) rose above {self.divergence_factor:g}x its initial "
                              f"value ({self._loss_reference:.4g})")
                    evidence["initial_loss"] = self._loss_reference
            if reason is not None:
                self._diverged(trainer, pl_module, reason, _evidence(**evidence), step=step)
                return

    def _diverged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str,
                  evidence: dict[str, Any], exception: BaseException | None = None, step: int | None = None) -> None:
        lrs = sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups if "lr" in g})
        evidence = {**evidence, "lr": [_num(v) for v in lrs] if len(lrs) > 1 else _num(lrs[0]) if lrs else "n/a"}
        restored = None
        if self.stop_on_divergence:
            restored = self._restore(trainer, pl_module)
            if exception is None:
                trainer.should_stop = True
                self._stopped = True
        evidence["restored_weights_from_step"] = restored if restored is not None else "none"
        clip = trainer.gradient_clip_val
        lr_text = f"{lrs[0]:g}" if len(lrs) == 1 else (str(lrs) if lrs else "the learning rate")
        action = ""
        if self.stop_on_divergence:
            if restored is None:
                action = " Training was stopped."
            else:
                which = ("the initial weights" if restored == 0 else
                         f"the weights of step {restored} (the last healthy epoch boundary)")
                action = (f" Training was stopped and {which} restored, so checkpoints written from now on hold "
                          "finite weights.")
        step = int(trainer.global_step) if step is None else step
        self._add(trainer, "divergence", step=step, evidence=evidence, message=(
            f"Training diverged at step {step}: {reason}.{action} "
            f"Fix: lower the learning rate (now {lr_text}; try 10x lower), clip gradients "
            f"(Trainer(gradient_clip_val=1.0){'' if not clip else f', now {clip}'}), add a warm-up, "
            "and check the inputs for extreme values."))

    # ---------------------------------------------------------------------------- weights snapshots
    def _state_tensors(self, pl_module: pl.LightningModule, fresh: bool = False) -> tuple[list[Tensor], int]:
        """Parameters then buffers (what divergence must restore), and how many are parameters (cached)."""
        if fresh or self._tensors is None:
            params = list(pl_module.parameters())
            self._tensors = (params + list(pl_module.buffers()), len(params))
        return self._tensors

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, check: bool = True) -> None:
        """Copy the weights to CPU if they are finite (and measure how far they moved since the last copy)."""
        step = int(trainer.global_step)
        if self._snapshot_step == step and self._snapshot is not None:
            return
        tensors, n_params = self._state_tensors(pl_module)
        params = [p.detach() for p in tensors[:n_params] if p.is_floating_point()]
        if check and params:
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
                return
        old = self._snapshot
        reuse = (old is not None and not self._measure_change and len(old) == len(tensors)
                 and all(o.shape == t.shape and o.dtype == t.dtype for o, t in zip(old, tensors)))
        if reuse:  # the common case: one copy into the buffers of the previous snapshot
            assert old is not None
            with torch.no_grad():
                torch._foreach_copy_(old, [t.detach() for t in tensors])
            self._snapshot_step = step
            return
        new = [t.detach().to("cpu", copy=True) for t in tensors]
        if self._measure_change and old is not None and len(old) == len(new):
            self._measure_change = False
            pairs = [(n, o) for n, o in zip(new[:n_params], old[:n_params])
                     if n.is_floating_point() and n.shape == o.shape]
            if pairs:
                cur, prev = [n for n, _ in pairs], [o for _, o in pairs]
                delta = torch.stack(torch._foreach_norm(torch._foreach_sub(cur, prev))).norm()
                base = torch.stack(torch._foreach_norm(prev)).norm()
                self._weight_change = float(delta / base.clamp_min(1e-12))
        self._snapshot = new
        self._snapshot_step = step

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """Put the last healthy weights back and clear the optimisers' (possibly NaN) state."""
        tensors, _ = self._state_tensors(pl_module, fresh=True)
        if self._snapshot is None or len(self._snapshot) != len(tensors):
            return None
        with torch.no_grad():
            for target, saved in zip(tensors, self._snapshot):
                if target.shape == saved.shape:
                    target.copy_(saved)
        for opt in trainer.optimizers:
            opt.state.clear()
        return self._snapshot_step

    def _epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before checkpoints are written: read the last step's values, then keep the weights if healthy."""
        self._watch(trainer, pl_module, self._reader.flush())
        if self.keep_last_good and not self._stopped:
            self._take_snapshot(trainer, pl_module)

    # ------------------------------------------------------------------------------------ validation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._val_chunks.take()
        self._val_stats = None
        if not trainer.sanity_checking:
            self._epoch_boundary(trainer, pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active:
            return
        self._last_batch = ("val", batch)
        if "val" not in self._checked_first:
            self._checked_first.add("val")
            self._safely("the first validation batch's checks", self._check_batch, trainer, pl_module, batch, "val")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or trainer.sanity_checking:
            return
        logits, target, _ = self._outputs(outputs)
        if logits is not None and target is not None and self._val_chunks.add(logits, target):
            self._reduce_val_chunks()

    def _reduce_val_chunks(self) -> None:
        items = self._val_chunks.take()
        stats = self._safely("the validation statistics", self._eval_stats, items) if items else None
        if stats is None:
            return
        if self._val_stats is None or self._val_stats.shape != stats.shape:
            self._val_stats = stats
        else:
            self._val_stats = self._val_stats + stats

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or trainer.sanity_checking or self._num_classes is None:
            return
        # Stashed, not reduced: the training epoch's end reduces everything with one collective.
        self._reduce_val_chunks()
        size = 4 + 3 * _N_BINS + 3 * self._num_classes
        stats = self._val_stats if self._val_stats is not None and self._val_stats.numel() == size else None
        self._val_pending.append((int(trainer.current_epoch), int(trainer.global_step), stats))
        self._val_stats = None

    def _judge_validation(self, trainer: pl.Trainer, epoch: int, step: int, val: list[float],
                          train_nll: float, train_counts: list[float]) -> None:
        c = self._num_classes or 0
        n = val[1]
        if n <= 0:
            return
        k = _N_BINS
        count, conf, correct = val[4:4 + k], val[4 + k:4 + 2 * k], val[4 + 2 * k:4 + 3 * k]
        rest = val[4 + 3 * k:]
        tp, pred, tgt = rest[:c], rest[c:2 * c], rest[2 * c:3 * c]
        record = {
            "epoch": epoch, "step": step, "val_nll": val[0] / n, "val_acc": val[2] / n, "val_conf": val[3] / n,
            "val_ece": sum(abs(a - b) for a, b in zip(conf, correct)) / n,
            "val_ece_over": sum(max(a - b, 0.0) for a, b in zip(conf, correct)) / n,
            "train_nll": train_nll,
        }
        self._val_history.append(record)
        self._judge_collapse(trainer, tp, pred, tgt, train_counts, stage="val")
        self._judge_overconfidence(trainer)

    # --------------------------------------------------------------------------------- epoch end (train)
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._epoch_boundary(trainer, pl_module)
        self._reduce_train_chunks()
        device, dtype = self._device or pl_module.device, self._dtype
        c = self._num_classes or 0
        stats = self._train_stats if self._train_stats is not None and self._train_stats.numel() == 4 + c else \
            torch.zeros(4 + c, device=device, dtype=dtype)
        pending, self._val_pending = self._val_pending, []
        vsize = 4 + 3 * _N_BINS + 3 * c
        vals = [v if v is not None else torch.zeros(vsize, device=device, dtype=dtype) for _, _, v in pending]
        if self._single:
            values = [float(v) for v in self._train_rows] + stats.tolist() + [x for v in vals for x in v.tolist()]
        else:
            # One collective per epoch, on every rank (gradient norms are identical on every rank under DDP).
            sizes = torch.tensor(self._train_rows, dtype=dtype).to(device, non_blocking=True)
            packed = trainer.strategy.reduce(torch.cat([sizes, stats.to(device, dtype), *vals]), reduce_op="sum")
            values = packed.double().cpu().tolist()
        world = max(int(trainer.world_size), 1)
        n_rows, batches, nll_sum, n_valid, maxprob_sum, all_ignored = values[:6]
        counts = values[6:6 + c]
        val_values = values[6 + c:]
        # (per-step values read on the host: gradient norms are the same on every rank, the loss is this rank's)
        gn_sum, gn_count, gn_max = self._epoch_grad
        loss_sum, loss_count = self._epoch_loss
        self._train_stats = None
        self._train_rows = [0, 0]
        self._epochs_seen += 1
        record = {
            "epoch": int(trainer.current_epoch),
            "train_nll": nll_sum / n_valid if n_valid > 0 else float("nan"),
            "train_loss": loss_sum / loss_count if loss_count > 0 else float("nan"),
            "max_prob": maxprob_sum / n_rows if n_rows > 0 else float("nan"),
            "grad_norm": gn_sum / gn_count if gn_count > 0 else float("nan"),
            "grad_norm_max": gn_max if gn_count > 0 else float("nan"),
        }
        if self._weight_change is not None:
            record["weight_change"] = self._weight_change
            self._weight_change = None
        self._train_history.append(record)
        if c:
            self._train_counts = counts if self._train_counts is None else [a + b for a, b in
                                                                            zip(self._train_counts, counts)]
            if self._epochs_seen == 1 and self._dm_counts is None:
                self._judge_unseen(trainer, torch.tensor(counts, dtype=torch.float64), c,
                                   source="the first epoch's targets")
            train_counts = self._dm_counts.tolist() if self._dm_counts is not None else self._train_counts
            for i, (epoch, step, _) in enumerate(pending):
                self._judge_validation(trainer, epoch, step, val_values[i * vsize:(i + 1) * vsize],
                                       record["train_nll"], train_counts)
        if all_ignored > 0:
            self._add(trainer, "all_ignored_batch", evidence=_evidence(
                batches_all_ignored=int(all_ignored), batches=int(batches), epoch=int(trainer.current_epoch),
                labelled_fraction=n_valid / max(n_rows, 1), ignore_index=self._ignore),
                message=(
                f"{int(all_ignored)} of {int(batches)} training batches (summed over {world} rank(s)) had every "
                f"target equal to the ignore_index ({self._ignore}): they carry no gradient (xentlit's loss is 0 "
                "for them, a plain mean is NaN) yet still move momentum-based optimisers. Only "
                f"{100 * n_valid / max(n_rows, 1):.3g}% of the training targets are labelled. Fix: drop unlabeled "
                "rows from the training loader (or sample them with labelled ones), use larger batches, and check "
                "that ignore_index matches how the data marks unlabeled rows."))
        if self.log_metrics:
            metrics = {}
            if gn_count > 0:
                metrics["doctor/grad_norm"] = record["grad_norm"]
            if n_rows > 0:
                metrics["doctor/max_prob"] = record["max_prob"]
            self._log(trainer, metrics)
        self._judge_lr_too_low(trainer)

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Epoch values (already reduced over ranks) straight to the trainer's loggers (rank 0).

        Not through ``LightningModule.log``, which costs about a millisecond per key and epoch (it rebuilds its
        result objects every epoch): too much for a callback that stays on. The values are also in
        :attr:`ConvergenceDoctor.history`.
        """
        if not metrics:
            return
        if trainer.is_global_zero:
            metrics = {**metrics, "epoch": trainer.current_epoch}  # an int, as in Lightning's own rows
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ----------------------------------------------------------------------------------------- judges
    def _judge_lr_too_low(self, trainer: pl.Trainer) -> None:
        w = self.window
        hist = self._train_history
        if len(hist) < w or self._has("lr_too_low", "softmax_before_loss", "divergence") or self._stopped:
            return
        key, initial = "train_nll", self._initial_nll
        if not all(math.isfinite(h["train_nll"]) for h in hist[-w:]):  # no logits: the module's own loss
            key, initial = "train_loss", self._module_loss0 if self._module_loss0 is not None else self._last_loss
        recent = [h[key] for h in hist[-w:]]
        if not all(math.isfinite(v) for v in recent):
            return
        if initial is None or not math.isfinite(initial):
            initial = hist[0][key]
        mean = sum(recent) / w
        flat = (max(recent) - min(recent)) <= 0.01 * mean
        stuck = recent[-1] >= 0.9 * initial
        grads = [h["grad_norm"] for h in hist[-w:] if not math.isnan(h["grad_norm"])]
        healthy = bool(grads) and all(math.isfinite(g) and g > 1e-6 for g in grads) and (
            self._grad_reference is None or min(grads) > 1e-3 * self._grad_reference)
        if not (flat and stuck and healthy):
            return
        changes: list[float] = []
        if self.keep_last_good:
            # Distinguish "too low" from "no signal / too high": how far did the weights move in an epoch?
            # Measured (one CPU difference of two snapshots) only once the loss looks stuck.
            change = hist[-1].get("weight_change")
            if change is None:
                self._measure_change = True
                return
            changes = [change]
        if not changes or max(changes) < 1e-3:
            lrs = sorted({float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups if "lr" in g})
            lr_text = ", ".join(f"{v:g}" for v in lrs) or "?"
            self._add(trainer, "lr_too_low", evidence=_evidence(
                train_loss_last_epochs=recent, initial_loss=initial, grad_norm_last_epochs=grads,
                weight_change_per_epoch=changes if changes else "unknown", lr=lrs[0] if len(lrs) == 1 else lr_text),
                message=(
                f"The training loss has stayed flat at {recent[-1]:.4g} (initial {initial:.4g}) for {w} epochs "
                f"while the gradients are healthy (mean norm {grads[-1]:.3g})"
                + (f" and the weights barely move ({max(changes):.2g} relative change per epoch)" if changes else "")
                + f": the learning rate ({lr_text}) is too low. Fix: raise it by 10-1000x (about 1e-3 for "
                "Adam/AdamW, 0.01-0.1 for SGD with momentum), or run a learning-rate range test "
                "(lightning.pytorch.tuner.Tuner(trainer).lr_find(model))."))

    def _judge_collapse(self, trainer: pl.Trainer, tp: list[float], pred: list[float], tgt: list[float],
                        train_counts: list[float], stage: str) -> None:
        """Predictions concentrated on the training majority class while macro-F1 stays at chance level."""
        if self._has("majority_collapse"):
            return
        c, n = len(tgt), sum(tgt)
        tc = (list(train_counts) + [0.0] * c)[:c]
        if n <= 0 or len(tc) < c or sum(tc) <= 0:
            self._collapse_streak, self._last_collapse = 0, None
            return
        nonzero = [v for v in tc if v > 0]
        imbalance = max(tc) / min(nonzero)
        share = [v / n for v in pred]
        prior = [v / n for v in tgt]
        top = max(range(c), key=share.__getitem__)
        present = [i for i in range(c) if tgt[i] > 0 or pred[i] > 0]
        macro_f1 = sum(2 * tp[i] / (tgt[i] + pred[i]) for i in present) / max(len(present), 1)
        # macro-F1 of predictions drawn independently of the truth with the same class frequencies
        chance_f1 = sum(2 * prior[i] * share[i] / (prior[i] + share[i]) for i in present) / max(len(present), 1)
        collapsed = (imbalance >= 3.0 and top == max(range(c), key=tc.__getitem__) and share[top] >= 0.5
                     and share[top] >= 1.5 * prior[top] and macro_f1 <= chance_f1 + 0.05)
        if not collapsed:
            self._collapse_streak, self._last_collapse = 0, None
            return
        self._collapse_streak += 1
        self._last_collapse = dict(
            majority_class=top, predicted_share=share[top], true_share=prior[top], macro_f1=macro_f1,
            chance_macro_f1=chance_f1, train_imbalance_ratio=imbalance, train_majority_share=tc[top] / sum(tc),
            consecutive_epochs=self._collapse_streak)
        if self._collapse_streak >= self.window:
            self._report_collapse(trainer, stage)

    def _report_collapse(self, trainer: pl.Trainer, stage: str) -> None:
        ev = self._last_collapse
        if ev is None:
            return
        names = self._class_names(trainer, [ev["majority_class"]])
        self._add(trainer, "majority_collapse", stage=stage, evidence=_evidence(**ev), message=(
            f"Predictions have collapsed onto the majority class {names}: it receives "
            f"{100 * ev['predicted_share']:.3g}% of the {stage} predictions (its true share there is "
            f"{100 * ev['true_share']:.3g}%) and macro-F1 is {ev['macro_f1']:.3g}, at chance level "
            f"({ev['chance_macro_f1']:.3g}), for {ev['consecutive_epochs']} epoch(s); the training classes are "
            f"imbalanced {ev['train_imbalance_ratio']:.3g}:1. Fix: weight the loss by class "
            "(CrossEntropyLoss(class_weights='balanced' or 'effective_number')), use a focal loss or logit "
            "adjustment (subtract tau * log prior from the logits during training), or resample the classes."))

    def _judge_overconfidence(self, trainer: pl.Trainer) -> None:
        hist = self._val_history
        if (self._has("overconfidence", "divergence", "majority_collapse") or self._collapse_streak > 0
                or len(hist) < self.window):
            return
        best_i = min(range(len(hist)), key=lambda i: hist[i]["val_nll"])
        best, now, first = hist[best_i], hist[-1], hist[0]
        # Overfitting: the validation loss first improved, then rose for at least two epochs while the
        # training loss kept falling (a validation loss that never improved is a distribution problem instead).
        if best_i == 0 or best["val_nll"] > 0.95 * first["val_nll"] or len(hist) - 1 - best_i < 2:
            return
        rising = now["val_nll"] >= max(1.2 * best["val_nll"], best["val_nll"] + 0.05)
        falling = math.isfinite(now["train_nll"]) and now["train_nll"] <= 0.8 * best["train_nll"]
        # Calibration: the overconfident part of the calibration error (bins whose confidence exceeds their
        # accuracy) grew, so confidence, not just the loss, went wrong.
        overconfident = now["val_ece_over"] >= 0.05 and now["val_ece_over"] >= best["val_ece_over"] + 0.03
        if rising and falling and overconfident:
            self._add(trainer, "overconfidence", stage="val", evidence=_evidence(
                best_epoch=best["epoch"], val_loss_best=best["val_nll"], val_loss_now=now["val_nll"],
                train_loss_at_best=best["train_nll"], train_loss_now=now["train_nll"],
                val_overconfidence_error_best=best["val_ece_over"], val_overconfidence_error_now=now["val_ece_over"],
                val_ece_now=now["val_ece"], val_confidence_now=now["val_conf"], val_accuracy_now=now["val_acc"]),
                message=(
                f"The model is overfitting and becoming overconfident: since epoch {best['epoch']} the training "
                f"loss fell from {best['train_nll']:.3g} to {now['train_nll']:.3g} while the validation loss rose "
                f"from {best['val_nll']:.3g} to {now['val_nll']:.3g}, and the overconfident part of the validation "
                f"calibration error grew from {best['val_ece_over']:.3g} to {now['val_ece_over']:.3g} (mean "
                f"confidence {now['val_conf']:.3g} vs accuracy {now['val_acc']:.3g}). Fix: add label smoothing "
                "(CrossEntropyLoss(label_smoothing=0.1)), weight decay (AdamW), dropout or more data, and stop "
                f"early on val/loss (EarlyStopping), keeping the best checkpoint (epoch {best['epoch']})."))

    # ------------------------------------------------------------------------------------- ending
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        if self._collapse_streak > 0 and not self._has("majority_collapse"):
            self._report_collapse(trainer, "val")  # collapsed at the end of training, however short
        self._gather(trainer)
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self._active or self._finished:
            return
        try:
            self._remove_probe()
            if not isinstance(exception, KeyboardInterrupt) and self._last_batch is not None:
                stage, batch = self._last_batch
                self._checked_first.add(stage)
                shown = self._check_batch(trainer, pl_module, batch, stage)
                explained = any(code in ("non_finite_inputs", "target_out_of_range", "float_class_indices",
                                         "integer_one_hot_targets") for code in shown)
                if not explained and _DIVERGENCE_TEXT.search(str(exception)) and not self._has("divergence"):
                    step = self._batch_step if stage == "train" else int(trainer.global_step)
                    self._diverged(trainer, pl_module, f"{type(exception).__name__}: {exception}",
                                   _evidence(at_step=step, last_finite_train_loss="n/a" if self._last_loss is None
                                             else self._last_loss),
                                   exception=exception, step=step)
        except Exception as err:  # diagnosing must never hide the original error
            log.debug("ConvergenceDoctor could not analyse the exception: %s", err)
        self._finish(trainer, exception=exception)

    def _gather(self, trainer: pl.Trainer) -> None:
        """Merge the findings of every rank (one object all-gather, called on every rank)."""
        if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, [f.to_dict() for f in self.findings])
        seen = {f.code for f in self.findings}
        for rank_findings in gathered:
            for item in rank_findings or []:
                if item["code"] not in seen:
                    seen.add(item["code"])
                    self.findings.append(Finding(**item))

    def _finish(self, trainer: pl.Trainer, exception: BaseException | None = None) -> None:
        self._finished = True
        self._active = False
        if not trainer.is_global_zero:
            return
        report = self.report()
        if exception is not None:
            report["exception"] = f"{type(exception).__name__}: {exception}"
        path = None
        if self.report_file:
            try:
                path = Path(trainer.default_root_dir) / self.report_file
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(report, indent=2) + "\n")
            except OSError as err:
                log.warning("ConvergenceDoctor could not write %s: %s", path, err)
                path = None
        if self.verbose:
            text = self.summary()
            if path is not None:
                text += f"\n  report: {path}"
            say(text)
