"""Training-speed benchmark behind ``scripts/bench.py``: xentlit against hand-written PyTorch and plain Lightning.

All variants train the same MLP (64-256-256-10) with Adam on the digits repeated to about 36k rows, one epoch
per measurement, in one process, interleaved, several repetitions; the report gives medians and ratios (the
machine is shared and noisy: absolute times alone mean nothing). Validation is off in every variant, so the
epoch is the same work everywhere.

- A: a hand-written loop over ``DataLoader(TensorDataset)`` with per-sample collate (the usual tutorial loop)
- B: a hand-written loop indexing the tensors with a shuffled permutation (the floor)
- C: plain Lightning with a ``DataLoader(TensorDataset)`` (a minimal module logging its loss every step)
- D: xentlit's default training (``TensorDataModule``, metrics, CSV logging, checkpointing, progress bar, the
  doctor callback; ``steps_per_execution=auto`` resolves to 8 here: the optimiser batches are those of B)
- E: xentlit with its fastest settings: 32 optimiser steps per Lightning step, no progress bar, logger,
  doctor or input validation
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xentlit.data import TensorDataModule
from xentlit.losses import CrossEntropyLoss
from xentlit.module import XentModule
from xentlit.nets import MLP

ROOT = Path(__file__).resolve().parents[1]
REPEAT = 20  # 1797 digits x 20 = 35,940 rows


class Timing(NamedTuple):
    """Seconds of the training epoch (first step to the end of the epoch's logging and checkpoint) and of
    the whole ``fit`` call (adds Trainer set-up and end-of-fit work such as plots); equal for the hand loops."""

    epoch: float
    fit: float


class _EpochTimer(pl.Callback):
    """Times Lightning's training loop: ``on_train_start`` to ``on_train_end``."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = time.perf_counter() - self.start


def _timed_fit(trainer: pl.Trainer, module: pl.LightningModule, **data: Any) -> Timing:
    timer = _EpochTimer()
    trainer.callbacks.insert(0, timer)
    start = time.perf_counter()
    trainer.fit(module, **data)
    return Timing(timer.elapsed, time.perf_counter() - start)


def digits_tensors(repeat: int = REPEAT) -> tuple[torch.Tensor, torch.Tensor]:
    """The standardised digits, repeated ``repeat`` times."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x.repeat(repeat, 1), torch.tensor(digits.target).repeat(repeat)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(64, 10, hidden_sizes=(256, 256))


def _trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        max_epochs=1, accelerator="cpu", devices=1, limit_val_batches=0, num_sanity_val_steps=0,
        enable_model_summary=False, logger=False, enable_checkpointing=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def loop_tutorial(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Timing:
    """A: per-sample ``__getitem__`` + default collate."""
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(net(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    return Timing(elapsed, elapsed)


def loop_floor(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Timing:
    """B: index the tensors with slices of a shuffled permutation."""
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    return Timing(elapsed, elapsed)


class _PlainModule(pl.LightningModule):
    """The plain Lightning module of the tutorials."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def plain_lightning(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Timing:
    """C: plain Lightning, ``DataLoader(TensorDataset)``, the default progress bar."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    return _timed_fit(_trainer(), _PlainModule(), train_dataloaders=loader)


def xentlit_default(x: torch.Tensor, y: torch.Tensor, batch_size: int, out_dir: Path, doctor: bool = True) -> Timing:
    """D: the callbacks and logger of ``conf/train.yaml`` (composed from the shipped config)."""
    from hydra import compose, initialize_config_dir

    from xentlit.cli import _instantiate_group, resolve_monitor
    from xentlit.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out_dir}"])
    resolve_monitor(cfg, None)
    # Validation is off, so the callbacks that monitor a validation metric are replaced by an
    # unconditional end-of-epoch checkpoint (the same disk work).
    skip = {"EarlyStopping", "ModelCheckpoint"} | (set() if doctor else {"ConvergenceDoctor"})
    callbacks = [c for c in _instantiate_group(cfg.callbacks) if type(c).__name__ not in skip]
    callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True))
    trainer = _trainer(callbacks=callbacks, logger=_instantiate_group(cfg.logger), enable_checkpointing=True,
                       default_root_dir=str(out_dir))
    return _timed_fit(trainer, XentModule(_net()), datamodule=_datamodule(x, y, batch_size))


def _datamodule(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> TensorDataModule:
    """All rows for training, already standardised (as the other variants see them)."""
    return TensorDataModule(x, y, batch_size=batch_size, val_fraction=0.0, test_fraction=0.0, standardize=False)


def xentlit_fastest(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps_per_execution: int = 32) -> Timing:
    """E: xentlit with everything optional off and many optimiser steps per Lightning step."""
    module = XentModule(_net(), loss=CrossEntropyLoss(validate=False), steps_per_execution=steps_per_execution)
    return _timed_fit(_trainer(enable_progress_bar=False), module, datamodule=_datamodule(x, y, batch_size))


def launch_to_first_step(overrides: list[str]) -> float:
    """Seconds from starting ``scripts/train.py`` to its first training step (a fresh process)."""
    marker = ROOT / "outputs" / "bench" / f"first_step_{os.getpid()}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer.max_epochs=1", "test=false",
               "paths.log_dir=outputs/bench", "+callbacks.first_step._target_=xentlit.benchmark.FirstStepMarker",
               f"+callbacks.first_step.path={marker}", *overrides]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return float(marker.read_text()) - start


class FirstStepMarker(pl.Callback):
    """Writes the wall-clock time of the first training batch to ``path`` (for the launch measurement)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.done:
            Path(self.path).write_text(repr(time.time()))
            self.done = True


def peak_memory_mb(variant: str, batch_size: int) -> tuple[float, float]:
    """``(peak RSS, peak RSS during the run minus the RSS before it)`` in MiB, of a fresh process that imports
    everything and loads the data, resets the kernel's peak-RSS mark, then runs one epoch of ``variant``: the
    second figure is what the variant itself adds (NaN where ``/proc/self/clear_refs`` is not available)."""
    code = (
        "import resource, pathlib, tempfile; from xentlit import benchmark as b; import xentlit.cli; "
        "x, y = b.digits_tensors(); before = b._proc_status_mib('VmRSS'); reset = b._reset_peak_rss(); "
        f"kw = {{'out_dir': pathlib.Path(tempfile.mkdtemp())}} if {variant!r} == 'D' else {{}}; "
        f"b.VARIANTS[{variant!r}](x, y, {batch_size}, **kw); "
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(peak, b._proc_status_mib('VmHWM') - before if reset else float('nan'))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    peak, added = result.stdout.strip().splitlines()[-1].split()
    return float(peak), float(added)


def _proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (Linux: VmRSS now, VmHWM the peak since the last reset), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


VARIANTS: dict[str, Callable[..., Timing]] = {
    "A": loop_tutorial,
    "B": loop_floor,
    "C": plain_lightning,
    "D": xentlit_default,
    "E": xentlit_fastest,
}


def run(batch_sizes: tuple[int, ...] = (64, 512), repeats: int = 5, quick: bool = False,
        out_dir: Path | None = None) -> str:
    """Run the benchmark; return the Markdown report."""
    import tempfile

    torch.set_num_threads(1)
    x, y = digits_tensors(2 if quick else REPEAT)
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="xentlit-bench-"))
    lines = [f"torch {torch.__version__}, lightning {pl.__version__}, {len(x)} rows, 1 thread, "
             f"medians of {repeats} interleaved repetitions", ""]
    for batch_size in batch_sizes:
        times: dict[str, list[Timing]] = {name: [] for name in [*VARIANTS, "D-no-doctor"]}
        for _ in range(repeats):
            for name, fn in VARIANTS.items():
                kwargs = {"out_dir": out_dir} if name == "D" else {}
                times[name].append(fn(x, y, batch_size, **kwargs))
            times["D-no-doctor"].append(xentlit_default(x, y, batch_size, out_dir, doctor=False))
        med = {name: statistics.median(t.epoch for t in values) for name, values in times.items()}
        fit = {name: statistics.median(t.fit for t in values) for name, values in times.items()}
        lines += [f"### batch size {batch_size}", "",
                  "| variant | epoch time (s) | samples/s | vs B | whole fit (s) |", "|---|---|---|---|---|"]
        for name, value in med.items():
            lines.append(f"| {name} | {value:.3f} | {len(x) / value:,.0f} | {value / med['B']:.2f} | {fit[name]:.3f} |")
        lines += ["", f"D/B = {med['D'] / med['B']:.2f}, E/B = {med['E'] / med['B']:.2f}, "
                  f"A/D = {med['A'] / med['D']:.2f}, C/D = {med['C'] / med['D']:.2f}, "
                  f"doctor overhead D/D-no-doctor = {med['D'] / med['D-no-doctor']:.3f}", ""]
    if not quick:
        launch = statistics.median(launch_to_first_step([]) for _ in range(3))
        lines += [f"Launch of `python scripts/train.py` to its first training step: {launch:.2f} s (median of 3)", ""]
        lines += ["| variant | peak RSS (MiB), one epoch, batch 64 | added by the run (MiB) |", "|---|---|---|"]
        for name in VARIANTS:
            peak, added = peak_memory_mb(name, 64)
            lines.append(f"| {name} | {peak:.0f} | {added:.0f} |")
    return "\n".join(lines)
