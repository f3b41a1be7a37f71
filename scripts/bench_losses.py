"""Loss speed, eager and compiled, against F.cross_entropy (see xentlit/loss_benchmark.py):
`python scripts/bench_losses.py [--quick] [--no-compile] [--only REGEX]`."""

import sys

from xentlit.loss_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
