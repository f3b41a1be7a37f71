"""xentlit against pytorch-tabular's CategoryEmbedding model on real and messy tables (``scripts/compare_pytorch_tabular.py``).

Both sides get the same train/val/test rows (xentlit's seeded stratified split, written to three CSVs), the same
column roles (the schema xentlit infers: numeric and binary columns as continuous, categorical ones as
categorical, the rest left out), the same network (two hidden layers of 256, ReLU, embeddings by fastai's rule --
pytorch-tabular's default too), Adam at 1e-3, batch 128, 30 epochs, early stopping after 10 epochs without a
better validation loss and the best checkpoint for testing. pytorch-tabular leaves missing numbers to the user:
they get the training median, as xentlit imputes them. Each side runs as a fresh process (pytorch-tabular in its
own environment: it pins other versions of Lightning), timed from start to exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, LAYERS = 30, 128, "256-256"


def messy_table(n: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """A synthetic table with every column kind and a 3-class label that needs the categories and numbers together."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "customer_id": rng.permutation(n) + 10_000,
        "age": rng.normal(45, 12, n).round(0),
        "income": np.exp(rng.normal(10, 0.6, n)).round(2),
        "tenure_months": rng.integers(0, 120, n).astype(float),
        "region": rng.choice(["north", "south", "east", "west", "centre"], n, p=[0.3, 0.25, 0.2, 0.15, 0.1]),
        "plan": rng.choice(["basic", "plus", "pro"], n),
        "has_partner": rng.choice([True, False], n),
        "signup_source": rng.choice([f"src_{k}" for k in range(12)], n),
        "country": "NL",
    })
    score = np.stack([
        (df.age - 45) / 12 + np.where(df.plan == "pro", 1.0, 0.0) + rng.normal(0, 1.0, n),
        (np.log(df.income) - 10) / 0.6 + np.where(df.region.isin(["north", "east"]), 0.8, -0.4) + rng.normal(0, 1.0, n),
        df.tenure_months / 40 - 1.5 + np.where(df.has_partner, 0.7, 0.0)
        + np.where(df.signup_source.isin(["src_1", "src_5", "src_7"]), 1.0, 0.0) + rng.normal(0, 1.0, n),
    ], axis=1)
    df["churn_reason"] = np.array(["price", "service", "moved"])[score.argmax(1)]
    for column, share in (("income", 0.08), ("age", 0.03), ("region", 0.05), ("plan", 0.02)):
        df.loc[rng.random(n) < share, column] = None
    return df


def _write_splits(path: Path, label: str, out: Path) -> dict[str, list[str]]:
    """Write xentlit's train/val/test rows of ``path`` to ``out`` and return the column roles it infers."""
    from xentlit.data import FileDataModule

    dm = FileDataModule(str(path), label_column=label)
    dm.setup()
    frame = pd.read_csv(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in dm.split_indices.items():
        frame.iloc[rows].to_csv(out / f"{name}.csv", index=False)
    columns = dm.preprocessor.columns_
    return {"numeric": [c.name for c in columns if c.role in ("numeric", "binary")],
            "categorical": [c.name for c in columns if c.role == "categorical"]}


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def compare(tables: dict[str, tuple[Path, str]], pytorch_tabular_python: str, workdir: Path,
            seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """Run both sides on every table and seed; a Markdown table of means (and the per-seed values as JSON lines)."""
    rows, raw = [], []
    for name, (path, label) in tables.items():
        split_dir = workdir / name
        roles = _write_splits(path, label, split_dir)
        results: dict[str, list[dict[str, float]]] = {"xentlit": [], "pytorch-tabular": []}
        for seed in seeds:
            run_dir = split_dir / f"xentlit_seed{seed}"
            wall, _ = _timed([sys.executable, str(ROOT / "scripts" / "train.py"), "data=files",
                              f"data.path={split_dir / 'train.csv'}", f"data.val_path={split_dir / 'val.csv'}",
                              f"data.test_path={split_dir / 'test.csv'}", f"data.label_column={label}",
                              f"data.batch_size={BATCH}", f"trainer.max_epochs={EPOCHS}", f"seed={seed}",
                              f"hydra.run.dir={run_dir}"], cwd=workdir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            results["xentlit"].append({"acc": metrics["metrics"]["test/acc"],
                                       "f1_macro": metrics["metrics"]["test/f1_macro"], "wall_s": wall})
            spec = {"label": label, **roles, "epochs": EPOCHS, "batch_size": BATCH, "layers": LAYERS, "seed": seed}
            wall, out = _timed([pytorch_tabular_python, str(ROOT / "scripts" / "pytorch_tabular_side.py"),
                                str(split_dir), "--spec", json.dumps(spec)], cwd=workdir)
            results["pytorch-tabular"].append({**json.loads(out.strip().splitlines()[-1]), "wall_s": wall})
        n_rows = sum(len(pd.read_csv(split_dir / f"{s}.csv")) for s in ("train", "val", "test"))
        for side, runs in results.items():
            mean = {k: float(np.mean([r[k] for r in runs])) for k in ("acc", "f1_macro", "wall_s")}
            rows.append(f"| {name} ({n_rows:,} rows) | {side} | {mean['acc']:.4f} | {mean['f1_macro']:.4f} | "
                        f"{mean['wall_s']:.1f} s |")
            raw += [json.dumps({"table": name, "side": side, **r}) for r in runs]
    header = ["| table | model | test accuracy | test macro-F1 | wall time (whole process) |", "|---|---|---|---|---|"]
    return "\n".join(header + rows + ["", f"means over seeds {list(seeds)}; per run:", *raw])
