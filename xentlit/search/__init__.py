"""Hyperparameter search with Optuna over ordinary training runs: ``xentlit search`` / ``scripts/search.py``.

See :mod:`xentlit.search.run` for the design, ``conf/hparams_search/optuna.yaml`` for the settings.
"""

from xentlit.search.run import main
from xentlit.search.space import SearchConfig

__all__ = ["SearchConfig", "main"]
