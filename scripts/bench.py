"""Training-speed benchmark (see xentlit/benchmark.py): `python scripts/bench.py [--quick] [--repeats N]`."""

import argparse

from xentlit.benchmark import run

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: a smoke run")
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
args = parser.parse_args()
print(run(tuple(args.batch_sizes), repeats=1 if args.quick else args.repeats, quick=args.quick))
