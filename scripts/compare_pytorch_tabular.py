"""xentlit vs pytorch-tabular's CategoryEmbedding (see xentlit/tabular_comparison.py).

    python3 -m venv /tmp/ptvenv && /tmp/ptvenv/bin/pip install torch==2.13.0 pytorch-tabular==1.2.0
    python scripts/compare_pytorch_tabular.py --pytorch-tabular-python /tmp/ptvenv/bin/python
"""

import argparse
import tempfile
from pathlib import Path

from xentlit.tabular_comparison import ROOT, compare, messy_table

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--pytorch-tabular-python", required=True, help="a Python with pytorch-tabular installed")
parser.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp(prefix="xentlit-vs-pt-")))
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
args = parser.parse_args()
args.workdir.mkdir(parents=True, exist_ok=True)
messy = args.workdir / "messy_churn.csv"
messy_table().to_csv(messy, index=False)
tables = {"penguins_raw": (ROOT / "examples" / "data" / "penguins_raw.csv", "Species"),
          "messy_churn": (messy, "churn_reason")}
print(compare(tables, args.pytorch_tabular_python, args.workdir, tuple(args.seeds)))
