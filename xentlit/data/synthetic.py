"""Generated and bundled datasets: long-tailed, noisy, partly unlabeled Gaussian blobs; scikit-learn's digits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xentlit.data.base import Split, TensorDataModule
from xentlit.data.checks import _check_int

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
