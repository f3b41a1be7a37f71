"""Train a classifier: `python scripts/train.py [group=option ...] [key=value ...]` (Hydra overrides, -m sweeps).

The same as `xentlit train ...` from an installed xentlit; from a clone, this script composes the clone's conf/."""

from xentlit.cli import train
from xentlit.entry import hydra_entry

main = hydra_entry(train, config_name="train")

if __name__ == "__main__":
    main()
