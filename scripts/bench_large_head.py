"""Large-class head benchmark (see xentlit/large_head_benchmark.py): `python scripts/bench_large_head.py [--quick]`."""

import os
import sys

from xentlit.large_head_benchmark import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
