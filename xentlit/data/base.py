"""The base datamodule: train/val/test splits of an in-memory dataset, standardised with train statistics.

Every module yields batches ``(x, y)`` with ``x`` float32 of shape ``(B, F)`` and ``y``
either int64 class indices of shape ``(B,)`` (unlabeled rows carry ``ignore_index``) or
float32 class probabilities of shape ``(B, C)`` (soft targets).

Batches are cut from the stored tensors with a single index operation
(:meth:`TensorBatchDataset.__getitems__`), not assembled sample by sample, while the loaders
stay plain :class:`~torch.utils.data.DataLoader` objects so that Lightning can still inject a
``DistributedSampler`` under DDP.

The work is done by functions beside this module: :mod:`.checks` (features, targets, splits, classes),
:mod:`.splitting` (seeded, stratified splits), :mod:`.standardizing` (train statistics) and :mod:`.batching`
(datasets and loaders); the class wires them into Lightning's hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from xentlit.data.batching import TensorBatchDataset, batch_loader, eval_sampler
from xentlit.data.checks import (
    _as_features,
    _as_targets,
    check_constant_features,
    check_datamodule_arguments,
    check_label_counts,
    checked_splits,
    class_counts,
    resolve_classes,
)
from xentlit.data.splitting import Split, split_rows, take_splits
from xentlit.data.standardizing import check_statistics_width, feature_statistics, is_identity, statistics_from_state
from xentlit.plain import make_hparams_plain

__all__ = ["Split", "TensorDataModule"]

class TensorDataModule(LightningDataModule):
    """Train/val/test splits of an in-memory dataset, standardised with train statistics.

    Subclasses customise the data source through three hooks:

    * :meth:`load` -- the whole dataset ``(x, y, class_names_or_None)``;
    * :meth:`split` -- how one dataset becomes train/val/test (seeded, stratified);
    * :meth:`load_splits` -- the three splits (override for predefined splits). An override
      that knows the class names sets ``self._source_class_names`` (the default does so from
      :meth:`load`); the constructor's ``class_names`` take precedence.

    Everything happens once, in :meth:`setup`; the properties :attr:`num_features`,
    :attr:`num_classes`, :attr:`class_counts` and :attr:`class_names` run it on first access,
    so a model can be built from them before the Trainer starts.
    """

    def __init__(
        self,
        x: Tensor | np.ndarray | None = None,
        y: Tensor | np.ndarray | None = None,
        *,
        class_names: Sequence[str] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        standardize: bool = True,
        ignore_index: int = -100,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["x", "y"])
        make_hparams_plain(self)  # Hydra's ListConfig / numpy strings would make checkpoints refuse weights_only
        check_datamodule_arguments(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                                   split_seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction,
                                   on_device=on_device, pin_memory=pin_memory)
        self._x = x
        self._y = y
        self._class_names_arg = [str(c) for c in class_names] if class_names is not None else None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else None
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.standardize = bool(standardize)
        self.ignore_index = int(ignore_index)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.on_device = bool(on_device)
        # Set by XentModule for a fit: the train loader then serves this many batches at once (see
        # XentModule's steps_per_execution), and the module steps through them one batch_size at a time.
        self.steps_per_execution = 1

        self._train_dataset: TensorBatchDataset | None = None
        self._val_dataset: TensorBatchDataset | None = None
        self._test_dataset: TensorBatchDataset | None = None
        self._feature_mean: Tensor | None = None
        self._feature_std: Tensor | None = None
        self._split_indices: dict[str, np.ndarray] | None = None
        self._source_class_names: list[str] | None = None
        self._class_names: list[str] | None = None
        self._num_classes: int | None = None
        self._pending_stats: tuple[Tensor, Tensor] | None = None
        self._is_setup = False

    # ---------------------------------------------------------------- subclass hooks

    def load(self) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray, list[str] | None]:
        """The whole dataset: features, labels and class names (``None`` when unknown)."""
        missing = [n for n, v in (("x", self._x), ("y", self._y)) if v is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} got no {' and no '.join(missing)}: pass x and y to the "
                "constructor, or subclass it and override load() / load_splits()"
            )
        assert self._x is not None and self._y is not None
        return self._x, self._y, None

    def split(self, x: Tensor, y: Tensor) -> tuple[Split, Split, Split]:
        """Seeded, stratified train/val/test split by ``val_fraction``/``test_fraction``.

        Records the row indices in :attr:`split_indices`.
        """
        return self._split_by_fractions(x, y, self.val_fraction, self.test_fraction)

    def load_splits(self) -> tuple[Split, Split, Split]:
        """The train, val and test splits; by default :meth:`load` followed by :meth:`split`."""
        x, y, names = self.load()
        self._source_class_names = [str(n) for n in names] if names is not None else None
        xt = _as_features(x, "the dataset")
        yt = _as_targets(y, len(xt), self.ignore_index, "the dataset")
        return self.split(xt, yt)

    @property
    def standardizes_features(self) -> bool:
        """Whether ``standardize`` applies to every feature column; False where :meth:`load_splits` already
        scales the inputs itself (tables with categorical codes and missing-value indicators)."""
        return True

    @property
    def categorical_cardinalities(self) -> list[int]:
        """Categories (+1 for missing/unseen) of each categorical input; these are the last columns of ``x``,
        holding integer codes. Empty here: every column is numeric."""
        return []

    # ---------------------------------------------------------------- Lightning hooks

    def prepare_data(self) -> None:
        """Nothing to download: all data is in memory or on local disk."""

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, split and standardise once; with ``on_device``, move the splits to the trainer's
        device (one copy; batches are then indexed there, with no per-batch host-to-device transfer)."""
        if not self._is_setup:
            self._setup_splits()
        trainer = self.trainer
        if self.on_device and trainer is not None:
            self.to_device(trainer.strategy.root_device)

    def to_device(self, device: torch.device | str) -> None:
        """Move the three splits' tensors to ``device`` (what ``on_device=True`` does at set-up)."""
        if not self._is_setup:
            self._setup_splits()
        for name in ("_train_dataset", "_val_dataset", "_test_dataset"):
            ds = getattr(self, name)
            if ds.x.device != torch.device(device):
                setattr(self, name, TensorBatchDataset(ds.x.to(device), ds.y.to(device)))

    def _setup_splits(self) -> None:
        self._source_class_names = None
        train, *evals = self.load_splits()
        splits = checked_splits(train, evals, self.ignore_index)
        (x_tr, y_tr), (x_va, _), (x_te, _) = splits
        ys = [y for _, y in splits]
        self._class_names, self._num_classes = resolve_classes(
            ys, self._class_names_arg or self._source_class_names, self.ignore_index
        )
        check_label_counts(y_tr, ys, self._class_names, self.ignore_index)
        if self.batch_size > len(x_tr):
            rank_zero_info(f"batch_size={self.batch_size} is larger than the train split ({len(x_tr)} rows): "
                           f"each batch is the whole split")
            self.batch_size = len(x_tr)
        fit = self._pending_stats is None and self.standardize and self.standardizes_features
        mean, std = feature_statistics(x_tr, self._pending_stats, fit)
        self._feature_mean, self._feature_std = mean, std
        check_constant_features(x_tr, {"val": x_va, "test": x_te})
        identity = is_identity(mean, std)  # no copy of the data for no change
        self._train_dataset, self._val_dataset, self._test_dataset = (
            TensorBatchDataset(x if identity else self.transform(x), y) for x, y in splits
        )
        self._is_setup = True

    def state_dict(self) -> dict[str, Any]:
        """Feature statistics, so a checkpoint can standardise new data the same way."""
        stats = self._pending_stats if self._feature_mean is None else (self._feature_mean, self._feature_std)
        return {} if stats is None else {"feature_mean": stats[0].clone(), "feature_std": stats[1].clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's feature statistics (re-standardising data already set up)."""
        stats = statistics_from_state(state_dict)
        if stats is None:
            return
        if not self._is_setup:
            self._pending_stats = stats
            return
        assert self._feature_mean is not None and self._feature_std is not None
        mean, std = stats
        check_statistics_width(mean, self._feature_mean.shape[0])
        old_mean, old_std = self._feature_mean, self._feature_std
        if torch.equal(mean, old_mean) and torch.equal(std, old_std):
            return  # the usual resume: same data, same statistics; re-standardising would round differently
        self._feature_mean, self._feature_std = mean, std
        for ds in (self._train_dataset, self._val_dataset, self._test_dataset):
            assert ds is not None
            ds.x = self.transform(ds.x * old_std + old_mean)

    # ---------------------------------------------------------------- public helpers

    def transform(self, x: Tensor | np.ndarray) -> Tensor:
        """Standardise raw features with the stored (train) statistics."""
        if self._feature_mean is None:
            self._ensure_setup()
        assert self._feature_mean is not None and self._feature_std is not None
        xt = torch.as_tensor(x, dtype=torch.float32)
        return (xt - self._feature_mean) / self._feature_std

    @property
    def feature_mean(self) -> Tensor:
        """Per-feature mean used for standardisation (train split; zeros if not standardising)."""
        self._ensure_setup()
        assert self._feature_mean is not None
        return self._feature_mean

    @property
    def feature_std(self) -> Tensor:
        """Per-feature std used for standardisation (1 for constant features / no standardising)."""
        self._ensure_setup()
        assert self._feature_std is not None
        return self._feature_std

    @property
    def split_indices(self) -> dict[str, np.ndarray] | None:
        """Row indices of each split into the loaded dataset, or None for predefined splits."""
        self._ensure_setup()
        return self._split_indices

    @property
    def train_dataset(self) -> TensorBatchDataset:
        """The standardised train split (sets up on first access)."""
        self._ensure_setup()
        assert self._train_dataset is not None
        return self._train_dataset

    @property
    def val_dataset(self) -> TensorBatchDataset:
        """The standardised validation split (may be empty)."""
        self._ensure_setup()
        assert self._val_dataset is not None
        return self._val_dataset

    @property
    def test_dataset(self) -> TensorBatchDataset:
        """The standardised test split (may be empty)."""
        self._ensure_setup()
        assert self._test_dataset is not None
        return self._test_dataset

    @property
    def num_features(self) -> int:
        """Number of feature columns."""
        return int(self.train_dataset.x.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes (from class names, soft-target width, or max label + 1)."""
        self._ensure_setup()
        assert self._num_classes is not None
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        """Display name per class index (``["0", "1", ...]`` when unknown)."""
        self._ensure_setup()
        assert self._class_names is not None
        return list(self._class_names)

    @property
    def class_counts(self) -> Tensor:
        """Float per-class counts in the train split (unlabeled rows excluded; soft: column sums)."""
        return class_counts(self.train_dataset.y, self.num_classes, self.ignore_index)

    # ---------------------------------------------------------------- dataloaders

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning adds a DistributedSampler under DDP).

        With ``steps_per_execution = k`` each batch holds k batches' rows, in the same shuffled order (the
        module drops a short last batch itself when ``drop_last``).
        """
        k = self.steps_per_execution
        return batch_loader(self.train_dataset, self.batch_size * k, shuffle=True, drop_last=self.drop_last and k == 1,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order, or ``[]`` (no batches) when the split is empty."""
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in order, or ``[]`` (no batches) when the split is empty."""
        return self._eval_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader | list:
        """Prediction batches over the test split."""
        return self._eval_loader(self.test_dataset)

    # ---------------------------------------------------------------- internals

    def _ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()

    def _eval_loader(self, ds: TensorBatchDataset) -> DataLoader | list:
        """Ordered loader; each sample seen exactly once across DDP ranks."""
        if len(ds) == 0:
            return []
        return batch_loader(ds, self.eval_batch_size or self.batch_size, shuffle=False,
                            sampler=eval_sampler(ds, self.trainer), num_workers=self.num_workers,
                            pin_memory=self.pin_memory)

    def _split_by_fractions(
        self, x: Tensor, y: Tensor, val_fraction: float, test_fraction: float
    ) -> tuple[Split, Split, Split]:
        """Split by row counts ``round(fraction * n)``; stratified where sklearn allows."""
        return take_splits(x, y, self._split_rows(y, val_fraction, test_fraction))

    def _split_rows(self, y: Tensor, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
        """Sorted row indices of each split (seeded by ``split_seed``, stratified where sklearn allows); also
        recorded in :attr:`split_indices`."""
        self._split_indices = split_rows(y, val_fraction, test_fraction, self.split_seed)
        return self._split_indices
