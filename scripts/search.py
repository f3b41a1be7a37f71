"""Hyperparameter search: `python scripts/search.py [hparams_search.<key>=...] [training overrides ...]`."""

from pathlib import Path

from xentlit.search import main

if __name__ == "__main__":
    main(config_dir=Path(__file__).resolve().parents[1] / "conf")
