"""Lightning data modules over in-memory tensors.

Every module yields batches ``(x, y)`` with ``x`` float32 of shape ``(B, F)`` and ``y``
either int64 class indices of shape ``(B,)`` (unlabeled rows carry ``ignore_index``) or
float32 class probabilities of shape ``(B, C)`` (soft targets).

Batches are cut from the stored tensors with a single index operation
(:meth:`TensorBatchDataset.__getitems__`), not assembled sample by sample, while the loaders
stay plain :class:`~torch.utils.data.DataLoader` objects so that Lightning can still inject a
``DistributedSampler`` under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "TensorBatchDataset",
    "collate_batch",
    "TensorDataModule",
    "DigitsDataModule",
    "SyntheticDataModule",
    "FileDataModule",
]

Split = tuple[Tensor, Tensor]
ArrayLike = Tensor | np.ndarray

_SUPPORTED_SUFFIXES = (".csv", ".parquet", ".npz")


# --------------------------------------------------------------------------------------
# Fast batching
# --------------------------------------------------------------------------------------


class TensorBatchDataset(Dataset):
    """Features and targets held as two tensors, served a whole batch at a time.

    ``DataLoader``'s fetcher calls :meth:`__getitems__` with the list of sampled indices, so a
    batch costs one tensor index op instead of ``B`` ``__getitem__`` calls plus a collate.
    Pair it with :func:`collate_batch`.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}; they must match")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """One sample (kept for code that indexes the dataset directly)."""
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """The whole batch for ``indices`` with one index op per tensor."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x[idx], self.y[idx]


def collate_batch(batch: Any) -> Any:
    """Identity collate: :meth:`TensorBatchDataset.__getitems__` already returns the batch.

    Module level (not a lambda) so it pickles into worker processes.
    """
    return batch


# --------------------------------------------------------------------------------------
# Conversion and validation helpers
# --------------------------------------------------------------------------------------


def _to_tensor(a: Any, what: str, where: str) -> Tensor:
    """Numpy/array-like -> tensor, refusing non-numeric data with a readable message."""
    if isinstance(a, Tensor):
        t = a.detach().cpu()
    else:
        arr = np.asarray(a)
        if arr.dtype.kind not in "biuf":
            raise ValueError(
                f"{what} in {where} must be numeric, got numpy dtype {arr.dtype}"
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{what} in {where} must be real numeric, got {t.dtype}")
    return t


def _as_features(x: Any, where: str) -> Tensor:
    """Validate features (2-D, numeric, finite) and return them as float32."""
    t = _to_tensor(x, "features x", where)
    if t.ndim != 2:
        raise ValueError(
            f"features x in {where} must be 2-D (rows, features), got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 0:
        raise ValueError(f"features x in {where} have no columns (shape {tuple(t.shape)})")
    t = t.to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"features x in {where} contain {int(bad.sum())} non-finite value(s) (NaN/inf); "
            f"first at row {row}, column {col} (value {t[row, col].item()})"
        )
    return t.contiguous()


def _as_targets(y: Any, n_rows: int, ignore_index: int, where: str) -> Tensor:
    """Validate targets and return int64 indices (B,) or float32 soft targets (B, C)."""
    t = _to_tensor(y, "labels y", where)
    if t.ndim == 2 and t.shape[1] == 1 and not t.is_floating_point():
        t = t[:, 0]
    if len(t) != n_rows:
        raise ValueError(
            f"labels y in {where} have {len(t)} rows but features x have {n_rows}; "
            "they must have the same length"
        )
    if t.ndim == 2:
        if not t.is_floating_point():
            raise ValueError(
                f"2-D labels y in {where} must be floating soft targets (probabilities), "
                f"got dtype {t.dtype} with shape {tuple(t.shape)}"
            )
        t = t.to(torch.float32)
        if t.shape[1] < 2:
            raise ValueError(
                f"soft targets in {where} need at least 2 class columns, got shape {tuple(t.shape)}"
            )
        bad = ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"soft targets in {where} must be finite and >= 0; {int(bad.sum())} value(s) are "
                f"not, first at row {row}, column {col} (value {t[row, col].item()})"
            )
        sums = t.sum(dim=1)
        off = (sums - 1).abs() > 1e-3
        if bool(off.any()):
            row = int(off.nonzero()[0])
            raise ValueError(
                f"soft targets in {where} must sum to 1 per row; {int(off.sum())} row(s) do not, "
                f"first row {row} sums to {sums[row].item():.6g}"
            )
        return t.contiguous()
    if t.ndim != 1:
        raise ValueError(
            f"labels y in {where} must be 1-D class indices or 2-D soft targets, "
            f"got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"labels y in {where} must be whole numbers (class indices); {int(bad.sum())} "
                f"are not, first at row {row} (value {t[row].item()})"
            )
    t = t.to(torch.int64)
    bad = (t < 0) & (t != ignore_index)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"labels y in {where} contain negative label {int(t[row])} at row {row}; labels must be "
            f"class indices >= 0 or the ignore_index {ignore_index} for unlabeled rows"
        )
    return t.contiguous()


def _is_soft(y: Tensor) -> bool:
    return y.ndim == 2


def _hard_labels(y: Tensor) -> Tensor:
    """Class index per row (argmax for soft targets), used for stratification."""
    return y.argmax(dim=1) if _is_soft(y) else y


# --------------------------------------------------------------------------------------
# Base module
# --------------------------------------------------------------------------------------


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
        _check_int("batch_size", batch_size, minimum=1)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        _check_int("split_seed", split_seed, minimum=0)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not (isinstance(frac, (int, float)) and 0.0 <= float(frac) < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
        if float(val_fraction) + float(test_fraction) >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave a train split, got "
                f"{val_fraction} + {test_fraction} = {float(val_fraction) + float(test_fraction)}"
            )
        self._x = x
        self._y = y
        self._class_names_arg = list(class_names) if class_names is not None else None
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
        if on_device and (num_workers or pin_memory):
            raise ValueError(
                f"on_device=True keeps the data on the accelerator, which worker processes and pinned memory cannot "
                f"serve: got num_workers={num_workers}, pin_memory={pin_memory}; use num_workers=0, pin_memory=False"
            )
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
        self._source_class_names = list(names) if names is not None else None
        xt = _as_features(x, "the dataset")
        yt = _as_targets(y, len(xt), self.ignore_index, "the dataset")
        return self.split(xt, yt)

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
        (x_tr, y_tr), *evals = self.load_splits()
        x_tr = _as_features(x_tr, "the train split")
        y_tr = _as_targets(y_tr, len(x_tr), self.ignore_index, "the train split")
        if len(x_tr) == 0:
            raise ValueError(
                "the train split is empty; lower val_fraction/test_fraction or provide more rows"
            )
        n_feat = x_tr.shape[1]
        splits: list[Split] = [(x_tr, y_tr)]
        for name, (x, y) in zip(("val", "test"), evals):
            if len(x) == 0 and len(y) == 0:  # empty split: any shape will do
                splits.append((x_tr[:0].clone(), y_tr[:0].clone()))
                continue
            where = f"the {name} split"
            x = _as_features(x, where)
            y = _as_targets(y, len(x), self.ignore_index, where)
            if x.shape[1] != n_feat:
                raise ValueError(
                    f"{where} has {x.shape[1]} features but the train split has {n_feat}"
                )
            if _is_soft(y) != _is_soft(y_tr) or (_is_soft(y) and y.shape[1] != y_tr.shape[1]):
                raise ValueError(
                    f"{where}'s labels have shape {tuple(y.shape)} but the train split's have "
                    f"{tuple(y_tr.shape)}; use the same kind of targets everywhere"
                )
            splits.append((x, y))
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits

        self._class_names, self._num_classes = self._resolve_classes([y for _, y in splits])
        self._check_label_counts(y_tr, [y for _, y in splits])
        if self.batch_size > len(x_tr):
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the train split ({len(x_tr)} rows); "
                "use a batch_size <= the number of training rows"
            )

        if self._pending_stats is not None:
            mean, std = self._pending_stats
            if mean.shape != (n_feat,):
                raise ValueError(
                    f"loaded feature statistics cover {mean.shape[0]} features but the data has "
                    f"{n_feat}"
                )
        elif self.standardize:
            mean, std = _fit_standardizer(x_tr)
        else:
            mean, std = torch.zeros(n_feat), torch.ones(n_feat)
        self._feature_mean, self._feature_std = mean, std
        self._train_dataset = TensorBatchDataset(self.transform(x_tr), y_tr)
        self._val_dataset = TensorBatchDataset(self.transform(x_va), y_va)
        self._test_dataset = TensorBatchDataset(self.transform(x_te), y_te)
        self._is_setup = True

    def state_dict(self) -> dict[str, Any]:
        """Feature statistics, so a checkpoint can standardise new data the same way."""
        if self._feature_mean is None or self._feature_std is None:
            if self._pending_stats is None:
                return {}
            return {"feature_mean": self._pending_stats[0].clone(), "feature_std": self._pending_stats[1].clone()}
        return {"feature_mean": self._feature_mean.clone(), "feature_std": self._feature_std.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's feature statistics (re-standardising data already set up)."""
        if "feature_mean" not in state_dict or "feature_std" not in state_dict:
            return
        mean = torch.as_tensor(state_dict["feature_mean"], dtype=torch.float32).cpu()
        std = torch.as_tensor(state_dict["feature_std"], dtype=torch.float32).cpu()
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(
                f"feature_mean/feature_std must be 1-D of equal length, got shapes "
                f"{tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if bool((std <= 0).any()):
            raise ValueError("feature_std in the state dict must be positive")
        if not self._is_setup:
            self._pending_stats = (mean, std)
            return
        assert self._feature_mean is not None and self._feature_std is not None
        if mean.shape != self._feature_mean.shape:
            raise ValueError(
                f"loaded feature statistics cover {mean.shape[0]} features but the data has "
                f"{self._feature_mean.shape[0]}"
            )
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
        y = self.train_dataset.y
        if _is_soft(y):
            return y.sum(dim=0).to(torch.float32)
        labelled = y[y != self.ignore_index]
        return torch.bincount(labelled, minlength=self.num_classes).to(torch.float32)

    # ---------------------------------------------------------------- dataloaders

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (Lightning adds a DistributedSampler under DDP).

        With ``steps_per_execution = k`` each batch holds k batches' rows, in the same shuffled order (the
        module drops a short last batch itself when ``drop_last``).
        """
        k = self.steps_per_execution
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size * k,
            shuffle=True,
            drop_last=self.drop_last and k == 1,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

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
        sampler = None
        trainer = self.trainer
        world_size = int(getattr(trainer, "world_size", 1)) if trainer is not None else 1
        if world_size > 1:
            rank = int(getattr(trainer, "global_rank", 0))
            if len(ds) < world_size:
                raise ValueError(
                    f"an evaluation split has {len(ds)} rows, fewer than world_size={world_size}; "
                    "every rank needs at least one row"
                )
            sampler = UnrepeatedDistributedSampler(
                ds, num_replicas=world_size, rank=rank, shuffle=False
            )
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size or self.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _split_by_fractions(
        self, x: Tensor, y: Tensor, val_fraction: float, test_fraction: float
    ) -> tuple[Split, Split, Split]:
        """Split by row counts ``round(fraction * n)``; stratified where sklearn allows."""
        n = len(x)
        n_test = int(round(test_fraction * n))
        n_val = int(round(val_fraction * n))
        if n - n_test - n_val < 1:
            raise ValueError(
                f"the train split is empty: {n} rows with val_fraction={val_fraction} "
                f"({n_val} rows) and test_fraction={test_fraction} ({n_test} rows)"
            )
        strata = _hard_labels(y).numpy()
        rng = np.random.RandomState(self.split_seed)
        idx = np.arange(n)
        rest, test_idx = _take(idx, strata, n_test, rng)
        train_idx, val_idx = _take(rest, strata, n_val, rng)
        train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)
        self._split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}

        def rows(ix: np.ndarray) -> Split:
            t = torch.as_tensor(ix, dtype=torch.long)
            return x[t], y[t]

        return rows(train_idx), rows(val_idx), rows(test_idx)

    def _resolve_classes(self, ys: list[Tensor]) -> tuple[list[str], int]:
        """Class names and count, checking labels against them."""
        names = self._class_names_arg or self._source_class_names
        y0 = ys[0]
        if _is_soft(y0):
            c = int(y0.shape[1])
            if names is not None and len(names) != c:
                raise ValueError(
                    f"soft targets have {c} class columns but {len(names)} class_names were given "
                    f"({names})"
                )
            return (list(names) if names is not None else [str(i) for i in range(c)]), c
        if names is not None:
            c = len(names)
            for split_name, y in zip(("train", "val", "test"), ys):
                bad = (y >= c) & (y != self.ignore_index)
                if bool(bad.any()):
                    row = int(bad.nonzero()[0])
                    raise ValueError(
                        f"label {int(y[row])} at row {row} of the {split_name} split is >= "
                        f"num_classes={c} (the number of class_names); labels must be in [0, {c})"
                    )
            return list(names), c
        labelled = torch.cat([y[y != self.ignore_index] for y in ys])
        if len(labelled) == 0:
            raise ValueError(
                f"no labelled rows: every label equals ignore_index={self.ignore_index}"
            )
        c = int(labelled.max()) + 1
        return [str(i) for i in range(c)], c

    def _check_label_counts(self, y_train: Tensor, ys: list[Tensor]) -> None:
        """Enough labelled rows overall and at least two classes to train on."""
        c = self._num_classes
        assert c is not None
        if _is_soft(y_train):
            return
        n_lab = sum(int((y != self.ignore_index).sum()) for y in ys)
        if n_lab < c:
            raise ValueError(
                f"only {n_lab} labelled row(s) for num_classes={c}; need at least one per class"
            )
        present = torch.unique(y_train[y_train != self.ignore_index])
        if len(present) < 2:
            which = f"class {int(present[0])}" if len(present) else "no class"
            raise ValueError(
                f"only one class present among labelled training rows ({which}); a classifier "
                "needs at least 2 classes"
            )
        if c < 2:
            raise ValueError(f"need at least 2 classes, got num_classes={c} ({self._class_names})")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _take(
    idx: np.ndarray, strata: np.ndarray, n_take: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_take`` of ``idx`` (stratified when every stratum can be split), return (rest, taken)."""
    if n_take == 0:
        return idx, idx[:0]
    s = strata[idx]
    _, counts = np.unique(s, return_counts=True)
    n_strata = len(counts)
    stratify = (
        counts.min() >= 2 and n_take >= n_strata and len(idx) - n_take >= n_strata
    )
    from sklearn.model_selection import train_test_split  # lazily: scikit-learn takes a second to import

    rest, taken = train_test_split(
        idx, test_size=n_take, random_state=rng, stratify=s if stratify else None
    )
    return rest, taken


def _fit_standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std (std 1 for constant features), in float64."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    std = x64.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12 * torch.clamp(mean.abs(), min=1.0), std, torch.ones_like(std))
    return mean.to(torch.float32), std.to(torch.float32)


# --------------------------------------------------------------------------------------
# Bundled and synthetic data
# --------------------------------------------------------------------------------------


class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled 8x8 handwritten digits: 1797 x 64, 10 classes (no download)."""

    def __init__(self, **kwargs: Any) -> None:
        """``kwargs``: :class:`TensorDataModule`'s options (``batch_size``, ``val_fraction``, ...)."""
        super().__init__(**kwargs)

    def load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The digits arrays from the scikit-learn package data."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64), [str(i) for i in range(10)]


def long_tail_counts(n_max: float, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class counts ``round(n_max * (1/imbalance_factor) ** (c / (C - 1)))`` (Cao et al. 2019)."""
    if num_classes == 1:
        return [int(round(n_max))]
    return [
        int(round(n_max * (1.0 / imbalance_factor) ** (c / (num_classes - 1))))
        for c in range(num_classes)
    ]


class SyntheticDataModule(TensorDataModule):
    """Gaussian class blobs with long-tail imbalance, label noise and unlabeled rows.

    Geometry: class means are ``sqrt(2) * class_sep`` times orthonormal random directions
    (random unit vectors when ``num_classes > num_features``), so any two means are
    ``2 * class_sep`` apart in units of the unit-variance isotropic noise (a pairwise Bayes error
    of ``Phi(-class_sep)``). Each feature then gets a random scale in [0.5, 5] and offset, so
    standardisation matters.

    Sizes: ``num_samples`` is the train size when balanced, ``n_max = num_samples / C``. The train
    split has ``long_tail_counts(n_max, C, imbalance_factor)`` rows per class; val and test are
    balanced with ``round(n_max * f / (1 - val_fraction - test_fraction))`` rows per class for
    ``f = val_fraction`` / ``test_fraction``, i.e. the fractions describe a balanced pool.

    Corruption (train split only; val/test keep clean labels): exactly
    ``round(unlabeled_fraction * n_train)`` rows get ``ignore_index``, then exactly
    ``round(label_noise * n_labelled)`` labelled rows get a label drawn uniformly from the other
    ``C - 1`` classes. ``clean_train_targets``, ``train_noisy_mask`` and
    ``train_unlabeled_mask`` record what was done. Everything is drawn from ``data_seed``;
    ``split_seed`` is not used. Val/test rows depend only on ``data_seed``, ``num_samples``,
    the sizes and the geometry, not on the imbalance or corruption settings.
    """

    def __init__(
        self,
        num_samples: int = 6000,
        num_features: int = 20,
        num_classes: int = 10,
        imbalance_factor: float = 1.0,
        label_noise: float = 0.0,
        unlabeled_fraction: float = 0.0,
        class_sep: float = 1.5,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_int("num_features", num_features, minimum=1)
        _check_int("num_classes", num_classes, minimum=2)
        _check_int("num_samples", num_samples, minimum=num_classes)
        _check_int("data_seed", data_seed, minimum=0)
        if not (isinstance(imbalance_factor, (int, float)) and imbalance_factor >= 1.0):
            raise ValueError(f"imbalance_factor must be >= 1 (1 = balanced), got {imbalance_factor!r}")
        for name, frac in (("label_noise", label_noise), ("unlabeled_fraction", unlabeled_fraction)):
            if not (isinstance(frac, (int, float)) and 0.0 <= float(frac) < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
        if not (isinstance(class_sep, (int, float)) and class_sep >= 0 and math.isfinite(class_sep)):
            raise ValueError(f"class_sep must be a finite number >= 0, got {class_sep!r}")
        self.n_samples_balanced = int(num_samples)
        self.n_features_cfg = int(num_features)
        self.n_classes_cfg = int(num_classes)
        self.imbalance_factor = float(imbalance_factor)
        self.label_noise = float(label_noise)
        self.unlabeled_fraction = float(unlabeled_fraction)
        self.class_sep = float(class_sep)
        self.data_seed = int(data_seed)
        self._clean_train_targets: Tensor | None = None
        self._train_noisy_mask: Tensor | None = None
        self._train_unlabeled_mask: Tensor | None = None

        counts = self.train_class_counts_profile()
        if min(counts) < 1:
            c = len(counts) - 1  # the profile decreases, so the last class is the smallest
            raise ValueError(
                f"imbalance_factor={imbalance_factor} with num_samples={num_samples} and "
                f"num_classes={num_classes} leaves class {c} with {counts[c]} training rows; "
                "raise num_samples or lower imbalance_factor"
            )

    @property
    def clean_train_targets(self) -> Tensor:
        """True class of every train row (before noise and unlabeling), aligned with train_dataset."""
        self._ensure_setup()
        assert self._clean_train_targets is not None
        return self._clean_train_targets

    @property
    def train_noisy_mask(self) -> Tensor:
        """Bool per train row: its label was flipped to another class."""
        self._ensure_setup()
        assert self._train_noisy_mask is not None
        return self._train_noisy_mask

    @property
    def train_unlabeled_mask(self) -> Tensor:
        """Bool per train row: its label was replaced by ignore_index."""
        self._ensure_setup()
        assert self._train_unlabeled_mask is not None
        return self._train_unlabeled_mask

    def train_class_counts_profile(self) -> list[int]:
        """Clean per-class train counts implied by the configuration."""
        n_max = self.n_samples_balanced / self.n_classes_cfg
        return long_tail_counts(n_max, self.n_classes_cfg, self.imbalance_factor)

    def eval_class_count(self, fraction: float) -> int:
        """Rows per class in a balanced evaluation split of the given fraction."""
        n_max = self.n_samples_balanced / self.n_classes_cfg
        return int(round(n_max * fraction / (1.0 - self.val_fraction - self.test_fraction)))

    def load(self) -> tuple[Tensor, Tensor, list[str]]:
        """All generated rows (train, val, test concatenated), with the train labels corrupted."""
        (xa, ya), (xb, yb), (xc, yc) = self.load_splits()
        return torch.cat([xa, xb, xc]), torch.cat([ya, yb, yc]), self._default_names()

    def load_splits(self) -> tuple[Split, Split, Split]:
        """Generate the imbalanced, corrupted train split and the balanced clean val/test splits."""
        C, F = self.n_classes_cfg, self.n_features_cfg
        geo_ss, train_ss, val_ss, test_ss, corrupt_ss = np.random.SeedSequence(self.data_seed).spawn(5)
        geo = np.random.default_rng(geo_ss)
        if C <= F:
            q, _ = np.linalg.qr(geo.standard_normal((F, C)))
            directions = q.T
        else:
            directions = geo.standard_normal((C, F))
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        centers = math.sqrt(2.0) * self.class_sep * directions
        scale = np.exp(geo.uniform(math.log(0.5), math.log(5.0), size=F))
        offset = geo.normal(0.0, 3.0, size=F)

        def sample(counts: list[int], ss: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng(ss)
            labels = np.repeat(np.arange(C), counts)
            x = centers[labels] + rng.standard_normal((len(labels), F))
            perm = rng.permutation(len(labels))
            return (x[perm] * scale + offset).astype(np.float32), labels[perm].astype(np.int64)

        x_tr, y_clean = sample(self.train_class_counts_profile(), train_ss)
        x_va, y_va = sample([self.eval_class_count(self.val_fraction)] * C, val_ss)
        x_te, y_te = sample([self.eval_class_count(self.test_fraction)] * C, test_ss)

        rng = np.random.default_rng(corrupt_ss)
        n = len(y_clean)
        y_tr = y_clean.copy()
        unlabeled = np.zeros(n, dtype=bool)
        n_unl = int(round(self.unlabeled_fraction * n))
        unlabeled[rng.choice(n, size=n_unl, replace=False)] = True
        labelled_rows = np.flatnonzero(~unlabeled)
        n_noisy = int(round(self.label_noise * len(labelled_rows)))
        noisy = np.zeros(n, dtype=bool)
        flip = rng.choice(labelled_rows, size=n_noisy, replace=False)
        noisy[flip] = True
        # Uniform over the other C-1 classes: shift by 1..C-1 modulo C.
        y_tr[flip] = (y_clean[flip] + rng.integers(1, C, size=n_noisy)) % C
        y_tr[unlabeled] = self.ignore_index

        self._clean_train_targets = torch.from_numpy(y_clean)
        self._train_noisy_mask = torch.from_numpy(noisy)
        self._train_unlabeled_mask = torch.from_numpy(unlabeled)
        self._split_indices = None
        self._source_class_names = self._default_names()
        return (
            (torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            (torch.from_numpy(x_va), torch.from_numpy(y_va)),
            (torch.from_numpy(x_te), torch.from_numpy(y_te)),
        )

    def _default_names(self) -> list[str]:
        return [f"class_{i}" for i in range(self.n_classes_cfg)]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


class FileDataModule(TensorDataModule):
    """Features and labels from ``.csv``, ``.parquet`` or ``.npz`` files.

    CSV/Parquet: ``label_column`` holds the labels, features are ``feature_columns`` (default:
    every other column, all of which must be numeric). NPZ: ``label_column`` is the label array's
    key; features come from key ``x`` or ``feature_columns[0]``.

    Labels: strings map to indices in sorted order (the class names); integers are used as is
    (``ignore_index`` allowed); whole-number floats are cast; missing labels (NaN/None/empty
    cells) become ``ignore_index``. With ``val_path``/``test_path`` those files are the
    predefined splits (string labels mapped with the main file's mapping); a split without a
    file is carved from ``path`` with its fraction, the other fraction being ignored.

    ``num_classes`` fixes the class count (labels must be below it); class names are then
    ``"0".."K-1"`` for integer labels, or the sorted strings padded with ``str(i)``.
    """

    def __init__(
        self,
        path: str,
        label_column: str = "label",
        feature_columns: Sequence[str] | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes is not None:
            _check_int("num_classes", num_classes, minimum=2)
            class_names = kwargs.get("class_names")
            if class_names is not None and len(class_names) != num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but {len(class_names)} class_names were given "
                    f"({list(class_names)})"
                )
        for name, p in (("path", path), ("val_path", val_path), ("test_path", test_path)):
            if p is not None:
                _check_suffix(name, str(p))
        self.path = str(path)
        self.label_column = str(label_column)
        self.feature_columns = list(feature_columns) if feature_columns is not None else None
        self.val_path = str(val_path) if val_path is not None else None
        self.test_path = str(test_path) if test_path is not None else None
        self.num_classes_arg = int(num_classes) if num_classes is not None else None
        self._label_mapping: dict[str, int] | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """Features, encoded labels and class names from ``path``."""
        x, raw = self._read(self.path)
        y, names = self._encode_labels(raw, self.path, main=True)
        return x, y, names

    def load_splits(self) -> tuple[Split, Split, Split]:
        """Predefined splits from ``val_path``/``test_path`` when given, else the base split."""
        if self.val_path is None and self.test_path is None:
            return super().load_splits()
        x, y, names = self.load()
        self._source_class_names = names
        xt = _as_features(x, f"file {self.path}")
        yt = _as_targets(y, len(xt), self.ignore_index, f"file {self.path}")
        vf = 0.0 if self.val_path is not None else self.val_fraction
        tf = 0.0 if self.test_path is not None else self.test_fraction
        train, val, test = self._split_by_fractions(xt, yt, vf, tf)

        def other(p: str) -> Split:
            xo, raw = self._read(p)
            yo, _ = self._encode_labels(raw, p, main=False)
            xo_t = _as_features(xo, f"file {p}")
            return xo_t, _as_targets(yo, len(xo_t), self.ignore_index, f"file {p}")

        if self.val_path is not None:
            val = other(self.val_path)
        if self.test_path is not None:
            test = other(self.test_path)
        return train, val, test

    # ---------------------------------------------------------------- readers

    def _read(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, raw labels) from one file."""
        x, raw = read_table(path, self.label_column, self.feature_columns)
        assert raw is not None
        return x, raw

    def _encode_labels(
        self, raw: np.ndarray, path: str, main: bool
    ) -> tuple[np.ndarray, list[str] | None]:
        """Raw label column -> int64 indices; the main file fixes the string -> index mapping."""
        raw = np.asarray(raw)
        if raw.ndim != 1:
            raise ValueError(f"labels in {path} must be 1-D, got shape {raw.shape}")
        missing = _missing_mask(raw)
        is_string = raw.dtype.kind in "USO"
        if main:
            self._label_mapping = (
                {v: i for i, v in enumerate(sorted({str(v) for v in raw[~missing]}))}
                if is_string
                else None
            )
        elif not missing.all() and is_string != (self._label_mapping is not None):
            kind, main_kind = ("string", "numeric") if is_string else ("numeric", "string")
            raise ValueError(
                f"labels in {path} are {kind} ({raw.dtype}) but {self.path} has {main_kind} labels"
            )
        y = np.full(len(raw), self.ignore_index, dtype=np.int64)
        if self._label_mapping is not None:
            for row in np.flatnonzero(~missing):
                key = str(raw[row])
                if key not in self._label_mapping:
                    raise ValueError(
                        f"label {key!r} at row {row} of {path} does not occur in {self.path}; "
                        f"known labels: {list(self._label_mapping)}"
                    )
                y[row] = self._label_mapping[key]
            names: list[str] | None = list(self._label_mapping)
        else:
            vals = raw.astype(np.float64)
            frac = ~missing & (vals != np.round(vals))
            if frac.any():
                row = int(np.flatnonzero(frac)[0])
                raise ValueError(f"label {raw[row].item()!r} at row {row} of {path} is not a whole number")
            y[~missing] = vals[~missing].astype(np.int64)
            neg = (y < 0) & (y != self.ignore_index)
            if neg.any():
                row = int(np.flatnonzero(neg)[0])
                raise ValueError(
                    f"label {int(y[row])} at row {row} of {path} is negative and not the "
                    f"ignore_index {self.ignore_index}"
                )
            names = None
        k = self.num_classes_arg
        if k is not None:
            too_big = (y >= k) & (y != self.ignore_index)
            if too_big.any():
                row = int(np.flatnonzero(too_big)[0])
                shown = str(raw[row]) if self._label_mapping is not None else int(y[row])
                raise ValueError(
                    f"label {shown!r} at row {row} of {path} is out of range for "
                    f"num_classes={k} (class index {int(y[row])} >= {k})"
                )
            names = (names or []) + [str(i) for i in range(len(names or []), k)]
        return y, names


def read_table(
    path: str | Path,
    label_column: str | None = "label",
    feature_columns: Sequence[str] | None = None,
    require_label: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features, raw labels)`` from a CSV, Parquet or NPZ file, with errors that name what is wrong.

    Features are every column except the label (or ``feature_columns``); for ``.npz`` the features are the
    array ``x`` (or ``feature_columns[0]``) and the labels the array ``label_column``. With
    ``require_label=False`` a missing label column is allowed (prediction inputs) and the labels are None.
    """
    p = Path(path)
    suffix = _check_suffix("path", str(path))
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if suffix == ".npz":
        return _read_npz(p, label_column, feature_columns, require_label)
    import pandas as pd

    df = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    has_label = label_column is not None and label_column in columns
    if require_label and not has_label:
        raise ValueError(f"label column {label_column!r} not found in {path}; available columns: {columns}")
    if feature_columns is not None:
        missing = [c for c in feature_columns if c not in columns]
        if missing:
            raise ValueError(f"feature column(s) {missing} not found in {path}; available columns: {columns}")
        feats = list(feature_columns)
    else:
        feats = [c for c in columns if c != label_column]
    if not feats:
        raise ValueError(f"{path} has no feature columns besides {label_column!r}")
    non_numeric = [c for c in feats if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise ValueError(
            f"non-numeric feature column(s) in {path}: "
            + ", ".join(f"{c!r} ({df[c].dtype})" for c in non_numeric)
        )
    x = df[feats].to_numpy(dtype=np.float64)
    return x, (df[label_column].to_numpy() if has_label else None)


def _read_npz(
    p: Path, label_column: str | None, feature_columns: Sequence[str] | None, require_label: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    if feature_columns is not None and len(feature_columns) != 1:
        raise ValueError(f"for .npz files feature_columns must name one array key, got {feature_columns}")
    x_key = feature_columns[0] if feature_columns else "x"
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = list(npz.files)
            wanted = [("feature", x_key)] + ([("label", label_column)] if require_label else [])
            for what, key in wanted:
                if key not in keys:
                    raise ValueError(f"{what} array {key!r} not found in {p}; available keys: {keys}")
            x = npz[x_key]
            raw = npz[label_column] if label_column in keys else None
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(f"{p} holds object arrays; store numeric or string arrays") from err
        raise
    if x.dtype.kind not in "biuf":
        raise ValueError(f"feature array {x_key!r} in {p} is not numeric (dtype {x.dtype})")
    return x, raw


def _check_suffix(name: str, path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUPPORTED_SUFFIXES:
        raise ValueError(
            f"{name}={path!r} has unsupported suffix {suffix or '(none)'!r}; "
            f"supported: {', '.join(_SUPPORTED_SUFFIXES)}"
        )
    return suffix


def _missing_mask(raw: np.ndarray) -> np.ndarray:
    """True where a label cell is empty (NaN or None)."""
    if raw.dtype.kind == "f":
        return np.isnan(raw)
    if raw.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in raw], dtype=bool)
    return np.zeros(len(raw), dtype=bool)
