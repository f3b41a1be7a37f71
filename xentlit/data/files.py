"""The user's own files: CSV, Parquet and NPZ tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xentlit.data.base import Split, TensorDataModule
from xentlit.data.checks import _as_features, _as_targets, _check_int

_SUPPORTED_SUFFIXES = (".csv", ".parquet", ".npz")

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
