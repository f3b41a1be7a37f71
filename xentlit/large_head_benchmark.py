"""Peak memory and time of a large-class head's loss: ``nn.Linear`` + ``F.cross_entropy`` vs the chunked
``xentlit.chunked.ChunkedLinearCrossEntropy``.

    python scripts/bench_large_head.py              # 50k classes, batch 8192, hidden 256, CPU (minutes)
    python scripts/bench_large_head.py --quick      # smoke run: 512 rows x 2000 classes x 32 (seconds)
    python scripts/bench_large_head.py --batch 4096 --classes 32000 --chunk-sizes 2048,512

What is measured: one training step of the head and its loss, ``loss = head_loss(hidden, target);
loss.backward()``, with ``hidden`` (N, D) requiring grad (it is the network body's output) and the head's
weight/bias as parameters; float32, class-index targets, mean reduction. The plain variant is
``F.cross_entropy(nn.Linear(D, C)(hidden), target)``; the chunked variants use the same weights.

Peak memory, two independent methods, each in a fresh subprocess per variant (so no variant inherits
another's allocator state or high-water mark):

* **allocated** — torch's own allocation records: the step runs under ``torch.profiler`` with
  ``profile_memory=True`` (on CUDA, ``torch.cuda.max_memory_allocated``); the peak is the maximum of the
  running sum of allocation/free sizes above the level at the start of the step
  (`xentlit.chunked.peak_allocated_bytes`). Deterministic: tensor bytes, no allocator/OS noise.
* **RSS** — what the OS sees: after building the inputs and one warm-up step (lazy initialisation,
  thread pools), gradients are dropped, the process's peak RSS is reset (``echo 5 > /proc/self/clear_refs``,
  Linux) and the step runs once; the figure is ``VmHWM`` (peak RSS) minus ``VmRSS`` just before the step.
  glibc serves allocations above 32 MiB with mmap and returns them on free, so the large (N, C) tensors
  show up in RSS at their size. Where the reset is not possible the figure is ``ru_maxrss`` minus the RSS
  before the step without a warm-up (marked in the table).

(``--quick`` measures every variant in turn in a single subprocess, to stay a few seconds long: a smoke
run, not a measurement.) Both include the gradients of hidden/weight/bias (the same for every variant).
The memory ratio is chunked / plain of the "allocated" peak.

Time: one more subprocess runs every variant back to back, the order alternating each repetition, after one
warm-up repetition; the table shows the median step time and the median over repetitions of the paired
ratio (variant / plain of the same repetition). Exactness: in that process, the loss and the gradients of
hidden, weight and bias of each chunked variant against the plain one (max absolute difference, and the
largest of |difference| / max |plain gradient| over the three gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# torch and xentlit.chunked are imported by the measuring subprocesses only: the parent just spawns and reports.
# The subprocesses run this module (``python -m xentlit.large_head_benchmark --child ...``) from the directory
# that holds this copy of the package, so they measure the same code as the parent.

MiB = 2.0**20
ROOT = Path(__file__).resolve().parents[1]


# ---- the workload -----------------------------------------------------------------------------


def build(batch: int, classes: int, hidden_size: int, device: str, seed: int = 0):
    """Inputs and the plain head (seeded): hidden (N, D) requiring grad, target (N,), nn.Linear(D, C)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(hidden_size, classes).to(device)
    hidden = torch.randn(batch, hidden_size, generator=g).to(device).requires_grad_()
    target = torch.randint(0, classes, (batch,), generator=g).to(device)
    return hidden, target, head


def make_step(variant: str, head: nn.Linear):
    """``step(hidden, target) -> loss`` for "plain" or "chunked:<chunk_size>" (sharing head's parameters)."""
    import torch.nn.functional as F

    from xentlit.chunked import ChunkedLinearCrossEntropy

    if variant == "plain":
        return lambda h, t: F.cross_entropy(head(h), t)
    chunk_size = int(variant.split(":", 1)[1])
    chunked = ChunkedLinearCrossEntropy(head.in_features, head.out_features, chunk_size=chunk_size)
    chunked.weight, chunked.bias = head.weight, head.bias  # the very same parameters
    return chunked


def clear_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


# ---- subprocess children ------------------------------------------------------------------------


def child_memory(args: argparse.Namespace, variant: str) -> dict:
    import torch

    from xentlit.chunked import peak_allocated_bytes

    hidden, target, head = build(args.batch, args.classes, args.hidden, args.device)
    step = make_step(variant, head)
    params = (hidden, head.weight, head.bias)

    def run() -> None:
        step(hidden, target).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    rss_method = "VmHWM"
    if args.device == "cpu" and _reset_peak_rss():
        run()  # warm-up
        clear_grads(*params)
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        run()
        rss_peak = (_status_kib("VmHWM") - before) * 1024
    elif args.device == "cpu":
        rss_method = "ru_maxrss (no reset)"
        before = _status_kib("VmRSS") or 0
        run()
        rss_peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    else:
        rss_method, rss_peak = "n/a", None
    clear_grads(*params)
    allocated = peak_allocated_bytes(run, device=hidden.device)
    return {"variant": variant, "allocated": allocated, "rss": rss_peak, "rss_method": rss_method}


def child_time(args: argparse.Namespace, variants: list[str]) -> dict:
    import torch

    hidden, target, head = build(args.batch, args.classes, args.hidden, args.device)
    steps = {v: make_step(v, head) for v in variants}
    params = (hidden, head.weight, head.bias)

    def timed(v: str) -> float:
        clear_grads(*params)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        steps[v](hidden, target).backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.warmup + args.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            elapsed = timed(v)
            if rep >= args.warmup:
                times[v].append(elapsed)

    results: dict[str, dict] = {}
    ref = None
    for v in variants:
        clear_grads(*params)
        loss = steps[v](hidden, target)
        loss.backward()
        got = (loss.detach().double(), *(p.grad.detach().double() for p in params))
        if v == "plain":
            ref = got
        results[v] = {
            "ms": 1e3 * statistics.median(times[v]),
            "ratio": statistics.median(a / b for a, b in zip(times[v], times["plain"])),
            "loss": float(got[0]),
        }
        if ref is not None:
            results[v]["loss_abs"] = float((got[0] - ref[0]).abs())
            results[v]["grad_abs"] = max(float((a - b).abs().max()) for a, b in zip(got[1:], ref[1:]))
            results[v]["grad_rel"] = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got[1:], ref[1:])
            )
    return {"results": results, "threads": torch.get_num_threads()}


def child(args: argparse.Namespace) -> dict:
    """A measuring subprocess: ``--child memory`` (each variant in turn) and/or ``time`` (all variants)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    out: dict = {}
    if "memory" in args.child.split(","):
        out["memory"] = {v: child_memory(args, v) for v in variants}
    if "time" in args.child.split(","):
        out["timing"] = child_time(args, variants)
    return out


def spawn(args: argparse.Namespace, what: str, variants: list[str]) -> dict:
    command = [sys.executable, "-m", "xentlit.large_head_benchmark", "--child", what, "--variants", ",".join(variants),
               "--batch", str(args.batch), "--classes", str(args.classes), "--hidden", str(args.hidden), "--device",
               args.device, "--reps", str(args.reps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------


def markdown(args: argparse.Namespace, memory: dict[str, dict], timing: dict) -> str:
    res = timing["results"]
    plain = memory["plain"]
    logits_mib = args.batch * args.classes * 4 / MiB
    rss_methods = {m["rss_method"] for m in memory.values()}
    lines = [
        f"Loss forward+backward of a {args.hidden} -> {args.classes} head on a batch of {args.batch}, float32, "
        f"{args.device.upper()}, {timing['threads']} thread(s); one (N, C) float32 tensor is "
        f"{logits_mib:.0f} MiB. Peak memory above the step's start (allocated: torch's allocation records; "
        f"RSS: {', '.join(sorted(rss_methods))}), "
        f"{'one process for all variants (--quick)' if args.quick else 'one fresh process per variant'}; "
        f"time: median of "
        f"{args.reps} interleaved repetitions; exactness: chunked vs plain loss / gradients.",
        "",
        "| variant | peak allocated (MiB) | peak RSS (MiB) | memory ratio | time (ms) | time ratio | "
        "abs. error loss | max rel. error grads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, mem in memory.items():
        name = "plain (nn.Linear + F.cross_entropy)" if v == "plain" else f"chunked, chunk_size={v.split(':')[1]}"
        rss = "n/a" if mem["rss"] is None else f"{mem['rss'] / MiB:.0f}"
        ratio = mem["allocated"] / plain["allocated"]
        r = res[v]
        err = "—" if v == "plain" else f"{r['loss_abs']:.1e}"
        gerr = "—" if v == "plain" else f"{r['grad_rel']:.1e}"
        lines.append(
            f"| {name} | {mem['allocated'] / MiB:.0f} | {rss} | {ratio:.3f} | {r['ms']:.0f} | "
            f"{r['ratio']:.2f}x | {err} | {gerr} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192, help="N, rows per step (default 8192)")
    parser.add_argument("--classes", type=int, default=50_000, help="C, classes (default 50000)")
    parser.add_argument("--hidden", type=int, default=256, help="D, the head's input features (default 256)")
    parser.add_argument("--chunk-sizes", default="4096,1024,256", help="comma-separated chunk sizes")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 x 2000 x 32, chunk_size 128, 3 reps")
    parser.add_argument("--json", action="store_true", help="also print the raw measurements as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.batch, args.classes, args.hidden, args.chunk_sizes, args.reps = 512, 2000, 32, "128", 3
    variants = ["plain", *(f"chunked:{int(c)}" for c in args.chunk_sizes.split(","))]
    if args.quick:  # smoke run: one subprocess for everything (the memory figures are then less isolated)
        measured = spawn(args, "memory,time", variants)
        memory, timing = measured["memory"], measured["timing"]
    else:  # a fresh process per variant for memory, one for the interleaved timing
        memory = {v: spawn(args, "memory", [v])["memory"][v] for v in variants}
        timing = spawn(args, "time", variants)["timing"]
    print(markdown(args, memory, timing))
    if args.json:
        print(json.dumps({"memory": memory, "timing": timing}))
    return 0


if __name__ == "__main__":  # the measuring subprocesses (and `python -m xentlit.large_head_benchmark`)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
