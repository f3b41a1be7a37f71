"""Compare the loss variants: train each on a few datasets and seeds, tabulate and plot test metrics.

``python scripts/compare_losses.py`` runs the default comparison (every loss setting in `LOSS_SETTINGS`
on every dataset in `DATASETS`, 3 seeds) and writes, under ``outputs/compare/<timestamp>/``:

* ``results.csv``: one row per (dataset, loss, seed) with the test metrics and the wall time;
* ``summary.md``: per dataset, mean +- std over seeds of test accuracy, macro-F1, balanced accuracy
  and expected calibration error (ECE, 15 bins), best value per column in bold;
* ``comparison.png``: the same numbers as bars with std error bars;
* ``settings.json``: what was run; ``runs/<dataset>/<loss>/seed<k>/metrics.json``: each run's overrides and
  metrics (its ``paths.output_dir``).

Every run is composed with Hydra's compose API from the shipped ``conf/`` (``conf/train.yaml`` plus
the dataset's and loss's overrides, exactly what ``scripts/train.py`` would compose), built with
`xentlit.cli.build`, fitted for a fixed number of epochs and tested on its final weights (no
checkpoint selection, so no loss gets an early-stopping advantage on the clean validation split).
Runs go to a pool of worker processes with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from xentlit.atomic import write_atomic

# Dataset name -> Hydra overrides of conf/train.yaml.
DATASETS: dict[str, list[str]] = {
    "imbalanced": ["experiment=imbalanced"],  # synthetic, imbalance factor 100, balanced test split
    "noisy_labels": ["experiment=noisy_labels"],  # synthetic, 40% symmetric label noise on train only
    "digits": ["data=digits"],
}
# Loss setting name -> Hydra overrides: each conf/loss option with its shipped (paper) defaults, plus
# label smoothing and the z-loss, which are options of the base loss.
LOSS_SETTINGS: dict[str, list[str]] = {
    "cross_entropy": ["loss=cross_entropy"],
    "label_smoothing": ["loss=cross_entropy", "loss.label_smoothing=0.1"],
    "confidence_penalty": ["loss=confidence_penalty"],
    "focal": ["loss=focal"],
    "class_balanced": ["loss=class_balanced"],
    "logit_adjusted": ["loss=logit_adjusted"],
    "poly1": ["loss=poly1"],
    "symmetric_ce": ["loss=symmetric_ce"],
    "generalized_ce": ["loss=generalized_ce"],
    "z_loss": ["loss=cross_entropy", "loss.z_loss=1e-4"],
    "nce_rce": ["loss=nce_rce"],
    "nfl_rce": ["loss=nfl_rce"],
    "ldam": ["loss=ldam"],
    "ldam_drw": ["loss=ldam_drw", "loss.reweight_from_epoch=16"],  # the paper's 0.8 of the epochs (20 here)
}
# Post-hoc remedies, measured on each cross_entropy run's own model (no retraining): rows of their own.
POSTHOC_SETTINGS = ("cross_entropy + temperature", "cross_entropy + posthoc adjustment")
# Test metrics logged by XentModule -> column title (lower is better for ECE only).
METRICS: dict[str, str] = {
    "test/acc": "accuracy",
    "test/f1_macro": "macro-F1",
    "test/balanced_acc": "balanced acc.",
    "test/ece": "ECE",
}
LOWER_IS_BETTER = {"test/ece"}
# What every run shares: no loggers, callbacks or checkpoints, no validation loop (nothing selects on it).
COMMON_OVERRIDES = [
    "logger=none",
    "callbacks=none",
    "trainer.accelerator=cpu",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
]
QUICK_OVERRIDES = ["data.num_samples=1000"]  # synthetic datasets only (digits is small already)


def default_config_dir() -> Path:
    """The repository's ``conf/`` (next to the ``xentlit`` package)."""
    return Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Settings:
    """One comparison: which losses, datasets and seeds, for how long, and where to write."""

    losses: list[str] = field(default_factory=lambda: list(LOSS_SETTINGS))
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 20
    workers: int = 2
    out_dir: str = ""
    config_dir: str = ""
    extra_overrides: list[str] = field(default_factory=list)
    quick: bool = False

    def validate(self) -> None:
        for chosen, known, what in ((self.losses, LOSS_SETTINGS, "loss"), (self.datasets, DATASETS, "dataset")):
            unknown = [n for n in chosen if n not in known]
            if unknown:
                raise ValueError(f"unknown {what} {unknown}; expected some of {list(known)}")
            if not chosen:
                raise ValueError(f"no {what} selected")
        if not self.seeds:
            raise ValueError("no seeds selected")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def overrides_for(settings: Settings, dataset: str, loss: str, seed: int, output_dir: Path) -> list[str]:
    """The Hydra overrides of one run (dataset, then loss, then the shared ones)."""
    extra = list(settings.extra_overrides)
    if settings.quick and dataset != "digits":
        extra = QUICK_OVERRIDES + extra
    return [
        *DATASETS[dataset],
        *LOSS_SETTINGS[loss],
        *COMMON_OVERRIDES,
        f"trainer.max_epochs={settings.epochs}",
        f"seed={seed}",
        f"paths.output_dir={output_dir}",
        *extra,
    ]


def compose_run(config_dir: str | Path, overrides: Sequence[str]) -> Any:
    """``conf/train.yaml`` composed with ``overrides`` through Hydra's compose API (schemas registered)."""
    from hydra import compose, initialize_config_dir

    from xentlit.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def posthoc_rows(module: Any, datamodule: Any, row: dict[str, Any], ignore_index: int) -> list[dict[str, Any]]:
    """The post-hoc remedies applied to a trained cross-entropy model: temperature scaling fitted on the validation
    split, and logit adjustment (tau = 1) by the training priors; each one row of the same test metrics."""
    import torch

    from xentlit.calibration import Calibrator, adjust_logits, log_priors
    from xentlit.metrics import stage_metrics
    from xentlit.posthoc import split_logits

    test_logits, test_y = split_logits(module, datamodule.test_dataset)
    calibrator = Calibrator("temperature").fit(*split_logits(module, datamodule.val_dataset), ignore_index)
    variants = {
        POSTHOC_SETTINGS[0]: calibrator(test_logits.double()),
        POSTHOC_SETTINGS[1]: adjust_logits(test_logits.double(), log_priors(datamodule.class_counts), 1.0),
    }
    rows = []
    for name, logits in variants.items():
        metrics = stage_metrics("test", logits.shape[1], ignore_index, 15)
        metrics.update(logits.softmax(dim=1).float(), test_y)
        values = {key: float(value) for key, value in metrics.compute().items()}
        keep = test_y != ignore_index
        loss = float(torch.nn.functional.cross_entropy(logits[keep], test_y[keep]))
        rows.append({**row, "loss": name, **{key: values[key] for key in METRICS}, "test/loss": loss})
    return rows


def run_one(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Compose, build, fit and test one run; return its test metrics, and for cross-entropy those of the
    post-hoc remedies on the same model (executed in a worker process)."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch

    from xentlit.cli import build

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(GPU|TPU|HPU).*available.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    started = time.perf_counter()
    cfg = compose_run(job["config_dir"], job["overrides"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {name: float(value) for name, value in (results[0] if results else {}).items()}
    missing = [name for name in METRICS if name not in metrics]
    if missing:
        raise RuntimeError(f"run {job['dataset']}/{job['loss']}/seed{job['seed']} logged no {missing}")
    row = {"dataset": job["dataset"], "loss": job["loss"], "seed": job["seed"]}
    row.update({name: metrics[name] for name in METRICS})
    row["test/loss"] = metrics.get("test/loss", math.nan)
    row["seconds"] = round(time.perf_counter() - started, 2)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "metrics.json", json.dumps({"overrides": list(job["overrides"]), **row}, indent=2) + "\n")
    return [row, *posthoc_rows(module, datamodule, row, cfg.ignore_index)] if job["loss"] == "cross_entropy" else [row]


def run_all(settings: Settings) -> list[dict[str, Any]]:
    """Every (dataset, loss, seed) run, in a process pool; rows in a fixed order."""
    out = Path(settings.out_dir)
    jobs = []
    for dataset in settings.datasets:
        for loss in settings.losses:
            for seed in settings.seeds:
                run_dir = out / "runs" / dataset / loss / f"seed{seed}"
                jobs.append({
                    "dataset": dataset, "loss": loss, "seed": seed, "config_dir": settings.config_dir,
                    "overrides": overrides_for(settings, dataset, loss, seed, run_dir),
                })
    # Fail fast on a bad override (typo, unknown option) before starting any worker.
    for job in jobs[:: max(1, len(settings.seeds))]:
        compose_run(settings.config_dir, job["overrides"])
    rows: list[dict[str, Any]] = []
    if settings.workers == 1:
        for i, job in enumerate(jobs, 1):
            job_rows = run_one(job)
            rows.extend(job_rows)
            _progress(i, len(jobs), job_rows[0])
        return rows
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
    try:
        with ProcessPoolExecutor(max_workers=settings.workers, mp_context=get_context("spawn")) as pool:
            for i, job_rows in enumerate(pool.map(run_one, jobs), 1):
                rows.extend(job_rows)
                _progress(i, len(jobs), job_rows[0])
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return rows


def _progress(i: int, total: int, row: dict[str, Any]) -> None:
    print(
        f"[{i}/{total}] {row['dataset']:>12s} {row['loss']:>18s} seed {row['seed']}: "
        f"acc {row['test/acc']:.3f}  macro-F1 {row['test/f1_macro']:.3f}  ECE {row['test/ece']:.3f}  "
        f"({row['seconds']:.1f} s)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------- summaries


def summarize(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, tuple[float, float, int]]]:
    """``(dataset, loss) -> metric -> (mean, std, n)`` over seeds (sample std; 0 for one seed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["loss"]), []).append(row)
    summary = {}
    for key, members in groups.items():
        stats = {}
        for metric in METRICS:
            values = [float(m[metric]) for m in members]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[metric] = (statistics.fmean(values), std, len(values))
        summary[key] = stats
    return summary


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per dataset, a table of mean +- std per loss and metric; the best mean per column in bold."""
    summary = summarize(rows)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    losses = list(dict.fromkeys(row["loss"] for row in rows))
    n_seeds = max(len({r["seed"] for r in rows if r["dataset"] == d}) for d in datasets)
    lines = [f"Test metrics, mean ± std over {n_seeds} seed(s); best mean per column in bold "
             "(ECE: lower is better)."]
    for dataset in datasets:
        present = [loss for loss in losses if (dataset, loss) in summary]
        best = {}  # compared as printed (3 decimals), so that equal-looking means are equally bold
        for metric in METRICS:
            means = [round(summary[(dataset, loss)][metric][0], 3) for loss in present]
            best[metric] = min(means) if metric in LOWER_IS_BETTER else max(means)
        lines += ["", f"**{dataset}**", "", "| loss | " + " | ".join(METRICS.values()) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for loss in present:
            cells = []
            for metric in METRICS:
                mean, std, n = summary[(dataset, loss)][metric]
                text = f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"
                cells.append(f"**{text}**" if round(mean, 3) == best[metric] else text)
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(list(rows)).to_csv(path, index=False)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """A grid (datasets x metrics) of horizontal bars, mean +- std over seeds; cross-entropy in a
    darker colour with a dashed reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    losses = list(dict.fromkeys(row["loss"] for row in rows))
    n_rows, n_cols = len(datasets), len(METRICS)
    height = max(2.2, 0.32 * len(losses) + 1.2)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 1.6, height * n_rows), squeeze=False)
    for r, dataset in enumerate(datasets):
        present = [loss for loss in losses if (dataset, loss) in summary]
        positions = list(range(len(present)))[::-1]
        for c, (metric, title) in enumerate(METRICS.items()):
            ax = axes[r][c]
            means = [summary[(dataset, loss)][metric][0] for loss in present]
            stds = [summary[(dataset, loss)][metric][1] for loss in present]
            colors = ["#1f4e79" if loss == "cross_entropy" else "#8fb3d9" for loss in present]
            ax.barh(positions, means, xerr=stds, color=colors, ecolor="#333333", capsize=2, height=0.7)
            if "cross_entropy" in present:
                ax.axvline(means[present.index("cross_entropy")], color="#1f4e79", linestyle="--", linewidth=0.8)
            low = min(m - s for m, s in zip(means, stds))
            high = max(m + s for m, s in zip(means, stds))
            pad = max(0.02, 0.15 * (high - low))
            ax.set_xlim(max(0.0, low - pad), min(1.0, high + pad) if metric not in LOWER_IS_BETTER else high + pad)
            ax.set_yticks(positions)
            ax.set_yticklabels(present if c == 0 else [], fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.3)
            arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
            ax.set_title(f"{dataset}: {title}{arrow}", fontsize=10)
    n_seeds = max(len({r["seed"] for r in rows if r["dataset"] == d}) for d in datasets)
    fig.suptitle(f"xentlit loss comparison: test metrics, mean ± std over {n_seeds} seed(s)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(settings: Settings) -> Path:
    """Run the comparison and write results.csv, summary.md, comparison.png and settings.json."""
    settings.validate()
    if not settings.config_dir:
        settings.config_dir = str(default_config_dir())
    if not settings.out_dir:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        settings.out_dir = str(Path("outputs") / "compare" / stamp)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "settings.json", json.dumps(asdict(settings), indent=2) + "\n")
    started = time.perf_counter()
    rows = run_all(settings)
    write_csv(rows, out / "results.csv")
    table = markdown_table(rows)
    write_atomic(out / "summary.md", table)
    plot(rows, out / "comparison.png")
    print()
    print(table)
    runs = sum(1 for row in rows if row["loss"] not in POSTHOC_SETTINGS)  # (post-hoc rows reuse a run's model)
    print(f"{runs} runs in {time.perf_counter() - started:.0f} s; results in {out}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="compare_losses.py",
        description="Train every loss on imbalanced, noisy-label and digits data over a few seeds; "
        "write a CSV, a Markdown table and a plot under outputs/compare/<timestamp>/.",
    )
    parser.add_argument("--losses", nargs="+", default=list(LOSS_SETTINGS), metavar="LOSS",
                        help=f"loss settings (default: all of {', '.join(LOSS_SETTINGS)})")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="DATASET",
                        help=f"datasets (default: all of {', '.join(DATASETS)})")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per run (default 20)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel worker processes, one torch thread each (default: 2)")
    parser.add_argument("--out", default="", help="output directory (default outputs/compare/<timestamp>)")
    parser.add_argument("--config-dir", default="", help="Hydra config directory (default: the repo's conf/)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: cross_entropy and logit_adjusted, 1 seed, 1 epoch, 1000 synthetic rows")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. optimizer.lr=3e-3")
    args = parser.parse_args(argv)
    settings = Settings(losses=args.losses, datasets=args.datasets, seeds=list(range(args.seeds)),
                        epochs=args.epochs, workers=args.workers, out_dir=args.out, config_dir=args.config_dir,
                        extra_overrides=list(args.overrides), quick=args.quick)
    if args.quick:
        if args.losses == list(LOSS_SETTINGS):
            settings.losses = ["cross_entropy", "logit_adjusted"]
        settings.seeds = settings.seeds[:1] if args.seeds == 3 else settings.seeds
        settings.epochs = 1 if args.epochs == 20 else args.epochs
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    compare(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
