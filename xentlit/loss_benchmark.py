"""Forward+backward cost of every xentlit loss relative to ``F.cross_entropy`` with the same options, eager and
compiled (``compile=True``: `torch.compile`). Run it with ``python scripts/bench_losses.py``:

    python scripts/bench_losses.py                      # 4096 x 1000 on CPU, eager and compiled, a Markdown table
    python scripts/bench_losses.py --no-compile         # eager only (compiling every cell takes minutes)
    python scripts/bench_losses.py --quick              # tiny smoke run (seconds; eager only unless --compile)
    python scripts/bench_losses.py --only focal --only soft   # cells matching every pattern

Method: one process, one torch thread by default (``--threads``). Each (loss, setting) cell is compared with its
reference ``F.cross_entropy(x, t, weight=..., ignore_index=..., label_smoothing=...)`` (the same options as the
loss; probability targets for the "soft" setting). A compiled cell is compiled first (its first forward+backward,
timed: the compile time), outside the timings. A repetition visits every cell once, in a shuffled order, and times
a block of ``--inner`` alternating (loss, [compiled loss,] reference) runs there; the block's ratio is best loss
time / best reference time within the block (other processes only ever add time, and the sides of a block share
the machine's state of the moment). A cell's ratio is the median of its block ratios over the repetitions; the
best times overall are shown in milliseconds.

Memory: glibc's malloc hands (N, C) buffers this size back to the kernel when they are freed (mmap, heap
trimming), so the next allocation faults in freshly zeroed pages, a few milliseconds per buffer on a VM, which hits
one side of a pair or the other depending on the heap state the previous cells left: that, not the losses, would
decide many ratios. So the benchmark first asks malloc to keep freed memory for reuse (``mallopt``: no mmap up to
its limit, no trimming), as a caching allocator (jemalloc, tcmalloc, PyTorch's own on GPUs) does, and the timings
compare the computations. ``--system-malloc`` keeps glibc's defaults.
"""


from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import re
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from xentlit.losses import LOSSES, CrossEntropyLoss

# (row name, config name in LOSSES, constructor kwargs); the variants run with their defaults.
ROWS: list[tuple[str, str, dict]] = [
    *((name, name, {}) for name in LOSSES),
    ("cross_entropy + z_loss=1e-4", "cross_entropy", {"z_loss": 1e-4}),
]
SETTINGS = {
    "plain": "class indices",
    "weighted": "class weights + 10% ignored",
    "smoothing": "label_smoothing=0.1",
    "soft": "probability targets",
}


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (see the module docstring): raise its
    mmap threshold as far as it allows (32 MiB at least) and turn trimming off. Returns whether
    it could (False elsewhere than glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_ok = any(mallopt(m_mmap_threshold, size) for size in (1 << 30, 32 << 20))
    return bool(mmap_ok and mallopt(m_trim_threshold, (1 << 31) - 1))


def make_loss(name: str, kwargs: dict, setting: str, num_classes: int, counts: torch.Tensor,
              compile: bool = False) -> CrossEntropyLoss | None:
    """The loss for one cell, or None where the method does not define the setting."""
    cls = LOSSES[name]
    kwargs = dict(kwargs, compile=compile)
    if name == "class_balanced":
        kwargs["class_weights"] = "effective_number"
    elif setting == "weighted":
        kwargs["class_weights"] = (torch.rand(num_classes, generator=torch.Generator().manual_seed(1)) + 0.5)
    if setting == "smoothing":
        kwargs["label_smoothing"] = 0.1
    if setting in ("smoothing", "soft") and not cls.supports_soft_targets:
        return None
    loss = cls(**kwargs)
    if loss.needs_class_counts:
        loss.set_class_counts(counts)
    return loss


def reference(loss: CrossEntropyLoss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``F.cross_entropy`` with the loss's options (weight, ignore_index, label_smoothing)."""
    weight = loss.weight

    def ref(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x, t, weight=weight, ignore_index=loss.ignore_index,
                               label_smoothing=loss.label_smoothing)

    return ref


def time_step(fn: Callable, x: torch.Tensor, t: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x, t).backward()
    elapsed = time.perf_counter() - start
    x.grad = None
    return elapsed


def run(batch: int, num_classes: int, reps: int, warmup: int, inner: int = 3, seed: int = 0,
        only: list[str] | None = None, compile: bool = False) -> list[dict]:
    """Time every selected cell (see the module docstring); one dict per cell with its ratios and best times."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_classes, generator=g).mul_(3).requires_grad_()
    targets = {
        "plain": torch.randint(0, num_classes, (batch,), generator=g),
        "soft": torch.randn(batch, num_classes, generator=g).mul_(2).softmax(dim=1),
    }
    weighted = targets["plain"].clone()
    weighted[torch.rand(batch, generator=g) < 0.1] = -100
    targets["weighted"] = weighted
    targets["smoothing"] = targets["plain"]
    counts = torch.bincount(targets["plain"], minlength=num_classes).float()

    cells = []
    for row, name, kwargs in ROWS:
        for setting in SETTINGS:
            if only and not all(re.search(p, f"{row} {setting}") for p in only):
                continue
            loss = make_loss(name, kwargs, setting, num_classes, counts)
            if loss is None:
                continue
            cell = {"row": row, "name": name, "setting": setting, "t": targets[setting],
                    "sides": {"ours": loss, "ref": reference(loss)}, "times": {"ours": [], "ref": []},
                    "blocks": {"ours": []}}
            if compile:
                # each instance is a recompile of the same code (dynamo guards on the bound `self`); past
                # dynamo's recompile limit (8) it would silently run eagerly
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(ROWS) * len(SETTINGS))
                compiled = make_loss(name, kwargs, setting, num_classes, counts, compile=True)
                cell["compile_s"] = time_step(compiled, x, cell["t"])  # the first call compiles
                cell["sides"]["compiled"] = compiled
                cell["times"]["compiled"], cell["blocks"]["compiled"] = [], []
            cells.append(cell)
    order = list(range(len(cells)))
    rng = random.Random(seed)
    for rep in range(warmup + reps):
        rng.shuffle(order)
        for i in order:
            cell = cells[i]
            block: dict[str, list[float]] = {side: [] for side in cell["sides"]}
            for j in range(inner):
                runs = list(cell["sides"].items())
                if (rep + j) % 2:
                    runs.reverse()
                for side, fn in runs:
                    block[side].append(time_step(fn, x, cell["t"]))
            if rep >= warmup:
                for side, seconds in block.items():
                    cell["times"][side] += seconds
                for side in cell["blocks"]:
                    cell["blocks"][side].append(min(block[side]) / min(block["ref"]))
    for cell in cells:
        best = {side: 1e3 * min(seconds) for side, seconds in cell["times"].items()}
        cell["ours_ms"], cell["ref_ms"] = best["ours"], best["ref"]
        cell["ratio"] = statistics.median(cell["blocks"]["ours"])
        cell["best_ratio"] = best["ours"] / best["ref"]
        if "compiled" in best:
            cell["compiled_ms"] = best["compiled"]
            cell["compiled_ratio"] = statistics.median(cell["blocks"]["compiled"])
    return cells


def markdown(cells: list[dict], batch: int, num_classes: int, reps: int, inner: int,
             kept: bool = False) -> str:
    """The cells as a Markdown table: a row per loss, a column per setting."""
    by_row: dict[str, dict[str, dict]] = {}
    for cell in cells:
        by_row.setdefault(cell["row"], {})[cell["setting"]] = cell
    compiled = any("compiled_ratio" in cell for cell in cells)
    lines = [
        f"Forward+backward, batch {batch} x {num_classes} classes, float32, CPU, "
        f"{torch.get_num_threads()} thread(s), {reps} repetitions of {inner} interleaved runs, "
        f"{'freed memory kept by malloc' if kept else 'system malloc defaults'}. Cell: "
        "median block ratio to F.cross_entropy with the same options [ratio of the best times] "
        "(best xentlit ms / best F.cross_entropy ms)"
        + ("; then compiled (compile=True): median ratio, and the compile time." if compiled else "."),
        "",
        "| loss | " + " | ".join(SETTINGS.values()) + " |",
        "|" + "---|" * (1 + len(SETTINGS)),
    ]
    for row, settings in by_row.items():
        first = next(iter(settings.values()))
        parts = []
        for setting in SETTINGS:
            cell = settings.get(setting)
            if cell is None:  # not defined for the loss, or left out by --only
                parts.append("-" if LOSSES[first["name"]].supports_soft_targets else "n/a (indices only)")
                continue
            text = f"{cell['ratio']:.2f}x [{cell['best_ratio']:.2f}] ({cell['ours_ms']:.1f} / {cell['ref_ms']:.1f})"
            if "compiled_ratio" in cell:
                text += f"; compiled {cell['compiled_ratio']:.2f}x, {cell['compile_s']:.0f} s"
            parts.append(text)
        lines.append(f"| {row} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line of ``scripts/bench_losses.py``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (blocks) per cell")
    parser.add_argument("--inner", type=int, default=3, help="interleaved (loss, reference) pairs per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 x 50, 3 repetitions")
    parser.add_argument("--only", action="append", metavar="REGEX",
                        help="time only the cells whose 'row setting' (e.g. 'focal soft') matches "
                             "every such pattern (repeatable)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's malloc defaults (freed buffers go back to the kernel)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each loss with compile=True (default: yes, except with --quick)")
    args = parser.parse_args(argv)
    kept = not args.system_malloc and keep_freed_memory()
    if args.quick:
        args.batch, args.classes, args.reps, args.warmup, args.inner = 256, 50, 3, 1, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    compile = not args.quick if args.compile is None else args.compile
    cells = run(args.batch, args.classes, args.reps, args.warmup, args.inner, only=args.only, compile=compile)
    print(markdown(cells, args.batch, args.classes, args.reps, args.inner, kept))
    return 0
