"""Table-loading benchmark behind ``scripts/bench_tables.py``: time and memory of reading a large CSV.

A numeric CSV of ``rows x columns`` float features plus an integer label is written once (seeded). Then, each in a
fresh process (so nothing is cached or already imported):

- load: ``FileDataModule(path).setup()`` -- read (pyarrow, float32), split, fit the tabular pipeline, transform --
  against ``pandas.read_csv`` with its default engine reading the same file (the ratio is what to compare: this
  machine is shared and noisy);
- memory: the peak RSS of the whole training command ``scripts/train.py data=files data.path=<csv>`` for one epoch
  (the peak is reached in the first epoch: set-up, then training over data that is already in memory) against
  the peak RSS of a process that only imports what that command imports. The budget is imports + 3x the float32
  feature matrix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from xentlit.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]
_PEAK = textwrap.dedent("""
    import resource, subprocess, sys
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")
_LOAD = textwrap.dedent("""
    import json, sys, time
    import pyarrow.csv, sklearn.model_selection  # imported by any training run: not part of loading
    if sys.argv[2] == "pandas":
        import pandas as pd
        start = time.perf_counter()
        pd.read_csv(sys.argv[1])
    else:
        from xentlit import FileDataModule
        start = time.perf_counter()
        FileDataModule(sys.argv[1]).setup()
    print(json.dumps(time.perf_counter() - start))
""")
_IMPORTS = "import xentlit.cli, xentlit.config, lightning.pytorch, pyarrow.csv, sklearn.model_selection"


def make_csv(path: Path, rows: int, columns: int, seed: int = 0, chunk: int = 200_000) -> Path:
    """A CSV of ``columns`` float features (``f0``..) and an integer ``label`` (4 classes), written in chunks."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(columns, 4))
    schema = pa.schema([*(pa.field(f"f{i}", pa.float32()) for i in range(columns)), pa.field("label", pa.int64())])
    # atomically: a run killed while writing must not leave a short CSV that the next run takes as the benchmark's
    with atomic_path(path) as tmp, pacsv.CSVWriter(str(tmp), schema) as writer:
        for start in range(0, rows, chunk):
            x = rng.normal(size=(min(chunk, rows - start), columns)).round(4).astype(np.float32)  # ~8 bytes a cell
            label = (x @ weights + rng.gumbel(size=(len(x), 4))).argmax(1)
            arrays = [pa.array(x[:, i]) for i in range(columns)] + [pa.array(label)]
            writer.write_table(pa.Table.from_arrays(arrays, names=[f"f{i}" for i in range(columns)] + ["label"]))
    return path


def _peak_rss_mib(command: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _load_seconds(path: Path, reader: str) -> float:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path), reader], capture_output=True, text=True,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def run(rows: int, columns: int, workdir: Path, repeats: int = 3, train: bool = True) -> str:
    """Measure and return a Markdown report."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"table_{rows}x{columns}.csv"
    if not path.exists():
        make_csv(path, rows, columns)
    size_mib = path.stat().st_size / 2**20
    matrix_mib = rows * columns * 4 / 2**20
    loads = {reader: [] for reader in ("xentlit", "pandas")}
    for _ in range(repeats):  # interleaved
        for reader in loads:
            loads[reader].append(_load_seconds(path, reader))
    x, pd_ = float(np.median(loads["xentlit"])), float(np.median(loads["pandas"]))
    lines = [
        f"CSV: {rows:,} rows x {columns} float columns + label, {size_mib:.0f} MiB on disk; float32 matrix "
        f"{matrix_mib:.0f} MiB",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| `FileDataModule.setup()` (read, split, fit, transform), median of {repeats} | {x:.2f} s |",
        f"| `pandas.read_csv` (default engine, read only), median of {repeats} | {pd_:.2f} s |",
        f"| ratio xentlit / pandas | {x / pd_:.2f} |",
    ]
    if train:
        imports = _peak_rss_mib([sys.executable, "-c", _IMPORTS])
        command = [sys.executable, str(ROOT / "scripts" / "train.py"), "data=files", f"data.path={path}",
                   "trainer.max_epochs=1", f"hydra.run.dir={workdir / 'run'}"]
        peak = _peak_rss_mib(command)
        lines += [
            f"| peak RSS, imports only | {imports:.0f} MiB |",
            f"| peak RSS, training run (1 epoch) | {peak:.0f} MiB |",
            f"| (run - imports) / float32 matrix | {(peak - imports) / matrix_mib:.2f} (budget 3) |",
        ]
    return "\n".join(lines)
