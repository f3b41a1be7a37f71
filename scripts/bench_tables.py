"""Table-loading benchmark (see xentlit/table_benchmark.py): `python scripts/bench_tables.py [--rows N] [--columns F]`."""

import argparse
import tempfile
from pathlib import Path

from xentlit.table_benchmark import run

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--rows", type=int, default=1_000_000)
parser.add_argument("--columns", type=int, default=50)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "xentlit-bench-tables")
parser.add_argument("--no-train", action="store_true", help="measure loading only, not the training run's memory")
args = parser.parse_args()
print(run(args.rows, args.columns, args.workdir, repeats=args.repeats, train=not args.no_train))
