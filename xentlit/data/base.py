"""The base datamodule: train/val/test splits of an in-memory dataset, standardised with train statistics.

Every module yields batches ``(x, y)`` with ``x`` float32 of shape ``(B, F)`` and ``y``
either int64 class indices of shape ``(B,)`` (unlabeled rows carry ``ignore_index``) or
float32 class probabilities of shape ``(B, C)`` (soft targets).

Batches are cut from the stored tensors with a single index operation
(:meth:`TensorBatchDataset.__getitems__`), not assembled sample by sample, while the loaders
stay plain :class:`~torch.utils.data.DataLoader` objects so that Lightning can still inject a
``DistributedSampler`` under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from xentlit.data.batching import TensorBatchDataset, collate_batch
from xentlit.plain import make_hparams_plain
from xentlit.data.checks import _as_features, _as_targets, _check_int, _hard_labels, _is_soft

Split = tuple[Tensor, Tensor]

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
            rank_zero_info(f"batch_size={self.batch_size} is larger than the train split ({len(x_tr)} rows): "
                           f"each batch is the whole split")
            self.batch_size = len(x_tr)

        if self._pending_stats is not None:
            mean, std = self._pending_stats
            if mean.shape != (n_feat,):
                raise ValueError(
                    f"loaded feature statistics cover {mean.shape[0]} features but the data has "
                    f"{n_feat}"
                )
        elif self.standardize and self.standardizes_features:
            mean, std = _fit_standardizer(x_tr)
        else:
            mean, std = torch.zeros(n_feat), torch.ones(n_feat)
        self._feature_mean, self._feature_std = mean, std
        _check_constant_features(x_tr, {"val": x_va, "test": x_te})
        identity = not bool(mean.any()) and bool((std == 1).all())  # no copy of the data for no change
        self._train_dataset = TensorBatchDataset(x_tr if identity else self.transform(x_tr), y_tr)
        self._val_dataset = TensorBatchDataset(x_va if identity else self.transform(x_va), y_va)
        self._test_dataset = TensorBatchDataset(x_te if identity else self.transform(x_te), y_te)
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
        indices = self._split_rows(y, val_fraction, test_fraction)

        def rows(ix: np.ndarray) -> Split:
            t = torch.as_tensor(ix, dtype=torch.long)
            return x[t], y[t]

        return rows(indices["train"]), rows(indices["val"]), rows(indices["test"])

    def _split_rows(self, y: Tensor, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
        """Sorted row indices of each split (seeded by ``split_seed``, stratified where sklearn allows); also
        recorded in :attr:`split_indices`."""
        n = len(y)
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
        self._split_indices = {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}
        return self._split_indices

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
            return ([str(n) for n in names] if names is not None else [str(i) for i in range(c)]), c
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
            return [str(n) for n in names], c
        labelled = torch.cat([y[y != self.ignore_index] for y in ys])
        if len(labelled) == 0:
            raise ValueError(
                f"no labelled rows: every label equals ignore_index={self.ignore_index}"
            )
        c = int(labelled.max()) + 1
        if c > len(labelled):  # checked before any per-class list is built: a label of 1e9 is not 1e9 classes
            raise ValueError(
                f"label {c - 1} is a class index, which would make {c} classes for {len(labelled)} labelled rows; "
                "labels must be class indices 0..K-1 (map them, or store them as text: text labels are class names)"
            )
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


def _check_constant_features(x_train: Tensor, others: dict[str, Tensor]) -> None:
    """Refuse features that are all constant in the train split (nothing to learn from); say which constant
    features move far in another split (the network never saw them move, and standardising cannot scale them)."""
    if len(x_train) < 2:
        return
    constant = (x_train == x_train[0]).all(dim=0)
    if bool(constant.all()):
        raise ValueError(f"every feature column ({x_train.shape[1]}) is constant in the train split: there is "
                         "nothing to learn from; check the data (or the feature columns chosen)")
    # a train-constant feature moving by more than 10x the largest training spread is not noise the network can absorb
    limit = 10.0 * float(x_train[:, ~constant].double().std(dim=0, unbiased=False).max())
    for name, x in others.items():
        if len(x) == 0 or not bool(constant.any()):
            continue
        moved = ((x - x_train[0]).abs() * constant).amax(dim=0)
        if bool((moved > limit).any()):
            j = int(moved.argmax())
            rank_zero_warn(f"feature column {j} is constant in the train split ({float(x_train[0, j]):g}) but not "
                           f"in the {name} split (it differs by up to {float(moved[j]):.3g}): the network never saw it "
                           f"vary, so its predictions there are unreliable; {int((moved > limit).sum())} column(s) "
                           f"like it (moving by more than 10x the largest training spread, {limit:.3g})")


def _fit_standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std (std 1 for constant features), in float64."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=0)
    std = x64.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12 * torch.clamp(mean.abs(), min=1.0), std, torch.ones_like(std))
    return mean.to(torch.float32), std.to(torch.float32)
