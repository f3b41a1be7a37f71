"""Train a classifier: `python scripts/train.py [group=option ...] [key=value ...]` (Hydra overrides, -m sweeps)."""

import hydra
from omegaconf import DictConfig

from xentlit.cli import train
from xentlit.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
