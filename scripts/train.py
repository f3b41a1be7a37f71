"""Train a classifier: `python scripts/train.py [group=option ...] [key=value ...]` (Hydra overrides, -m sweeps)."""

from xentlit.cli import hydra_entry, train

main = hydra_entry(train, config_name="train")

if __name__ == "__main__":
    main()
