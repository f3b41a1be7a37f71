"""Forward+backward cost of every xentlit loss relative to ``F.cross_entropy`` with the same options.

    python scripts/bench_losses.py            # 4096 x 1000 on CPU, prints a Markdown table
    python scripts/bench_losses.py --quick    # tiny smoke run (seconds)
    python scripts/bench_losses.py --only focal --only soft   # cells matching every pattern

Method: one process, one torch thread by default (``--threads``). Each (loss, setting) cell is
compared with its reference ``F.cross_entropy(x, t, weight=..., ignore_index=...,
label_smoothing=...)`` (the same options as the loss; probability targets for the "soft"
setting). A repetition visits every cell once, in a shuffled order, and times a block of
``--inner`` alternating (loss, reference) pairs there; the block's ratio is best loss time /
best reference time within the block (other processes only ever add time, and the two sides
of a block share the machine's state of the moment). A cell's ratio is the median of its
block ratios over the repetitions; the best times overall are shown in milliseconds. Limits:
1.05x for plain cross-entropy, 2x for the variants.

Memory: glibc's malloc hands (N, C) buffers this size back to the kernel when they are freed
(mmap, heap trimming), so the next allocation faults in freshly zeroed pages, a few
milliseconds per buffer on a VM, which hits one side of a pair or the other depending on the
heap state the previous cells left: that, not the losses, would decide many ratios. So the
script first asks malloc to keep freed memory for reuse (``mallopt``: no mmap up to its limit,
no trimming), as a caching allocator (jemalloc, tcmalloc, PyTorch's own on GPUs) does, and the
timings compare the computations. ``--system-malloc`` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import re
import statistics
import sys
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
LIMITS = {"cross_entropy": 1.05}
DEFAULT_LIMIT = 2.0


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


def make_loss(name: str, kwargs: dict, setting: str, num_classes: int, counts: torch.Tensor):
    """The loss for one cell, or None where the method does not define the setting."""
    cls = LOSSES[name]
    kwargs = dict(kwargs)
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
        only: list[str] | None = None) -> list[dict]:
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
            if loss is not None:
                cells.append({"row": row, "name": name, "setting": setting, "loss": loss,
                              "ref": reference(loss), "t": targets[setting], "ours_s": [], "ref_s": [],
                              "blocks": []})
    order = list(range(len(cells)))
    rng = random.Random(seed)
    for rep in range(warmup + reps):
        rng.shuffle(order)
        for i in order:
            cell = cells[i]
            block: dict[str, list[float]] = {"ours_s": [], "ref_s": []}
            for j in range(inner):
                pair = [("ours_s", cell["loss"]), ("ref_s", cell["ref"])]
                if (rep + j) % 2:
                    pair.reverse()
                for key, fn in pair:
                    block[key].append(time_step(fn, x, cell["t"]))
            if rep >= warmup:
                cell["ours_s"] += block["ours_s"]
                cell["ref_s"] += block["ref_s"]
                cell["blocks"].append(min(block["ours_s"]) / min(block["ref_s"]))
    for cell in cells:
        cell["ours_ms"] = 1e3 * min(cell["ours_s"])
        cell["ref_ms"] = 1e3 * min(cell["ref_s"])
        cell["ratio"] = statistics.median(cell["blocks"])
        cell["best_ratio"] = cell["ours_ms"] / cell["ref_ms"]
        cell["limit"] = LIMITS.get(cell["row"], DEFAULT_LIMIT)
    return cells


def markdown(cells: list[dict], batch: int, num_classes: int, reps: int, inner: int,
             kept: bool = False) -> str:
    by_row: dict[str, dict[str, dict]] = {}
    for cell in cells:
        by_row.setdefault(cell["row"], {})[cell["setting"]] = cell
    head = "| loss | limit | " + " | ".join(SETTINGS.values()) + " |"
    lines = [
        f"Forward+backward, batch {batch} x {num_classes} classes, float32, CPU, "
        f"{torch.get_num_threads()} thread(s), {reps} repetitions of {inner} interleaved pairs, "
        f"{'freed memory kept by malloc' if kept else 'system malloc defaults'}. Cell: "
        "median block ratio to F.cross_entropy with the same options [ratio of the best times] "
        "(best xentlit ms / best F.cross_entropy ms).",
        "",
        head,
        "|" + "---|" * (2 + len(SETTINGS)),
    ]
    for row, settings in by_row.items():
        first = next(iter(settings.values()))
        limit = first["limit"]
        parts = []
        for setting in SETTINGS:
            cell = settings.get(setting)
            if cell is None:  # not defined for the loss, or left out by --only
                parts.append("-" if LOSSES[first["name"]].supports_soft_targets
                             else "n/a (indices only)")
            else:
                flag = "" if cell["ratio"] <= cell["limit"] else " **over**"
                parts.append(f"{cell['ratio']:.2f}x [{cell['best_ratio']:.2f}] "
                             f"({cell['ours_ms']:.1f} / {cell['ref_ms']:.1f}){flag}")
        lines.append(f"| {row} | {limit:g}x | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio is over its limit")
    args = parser.parse_args(argv)
    kept = not args.system_malloc and keep_freed_memory()
    if args.quick:
        args.batch, args.classes, args.reps, args.warmup, args.inner = 256, 50, 3, 1, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cells = run(args.batch, args.classes, args.reps, args.warmup, args.inner, only=args.only)
    print(markdown(cells, args.batch, args.classes, args.reps, args.inner, kept))
    over = [c for c in cells if c["ratio"] > c["limit"]]
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
