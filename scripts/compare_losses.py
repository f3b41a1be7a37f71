"""Compare the loss variants: `python scripts/compare_losses.py [--quick] [--seeds N] [--epochs E] [--losses ...]
[--datasets ...] [hydra.overrides ...]`. Writes results.csv, summary.md and comparison.png under
outputs/compare/<timestamp>/ (the logic lives in xentlit/compare.py)."""

import sys

from xentlit.compare import main

if __name__ == "__main__":
    sys.exit(main())
