"""The user's own files: CSV, Parquet and NPZ tables."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xentlit.data.base import Split, TensorDataModule
from xentlit.data.checks import _as_features, _as_targets, _check_int
from xentlit.data.tabular import Columns, TabularPreprocessor, _check_unique

_SUPPORTED_SUFFIXES = (".csv", ".parquet", ".npz")

class FileDataModule(TensorDataModule):
    """Features and labels from ``.csv``, ``.parquet`` or ``.npz`` files.

    CSV/Parquet: real tables. ``label_column`` holds the labels; every other column (or only
    ``feature_columns``) is a candidate input whose role -- numeric, binary, categorical, or dropped as
    ID-like, constant or free text -- is inferred from the training rows unless ``categorical_columns``,
    ``numeric_columns`` or ``drop_columns`` set it. Missing numbers get the training median plus a
    missing-value indicator input; missing or unseen categories get their own code; numeric columns are
    transformed by ``numeric_transform`` (``standardize``, ``quantile_normal`` or ``none``; binary inputs,
    indicators and codes never are). See :class:`~xentlit.data.tabular.TabularPreprocessor`, which is fitted on
    the training rows only and stored in checkpoints as plain data (``describe()`` prints the schema).

    NPZ: numeric arrays. ``label_column`` is the label array's key; features come from key ``x`` or
    ``feature_columns[0]``, standardised as a whole with ``standardize``.

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
        categorical_columns: Sequence[str] | None = None,
        numeric_columns: Sequence[str] | None = None,
        drop_columns: Sequence[str] | None = None,
        numeric_transform: str | None = None,
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
        self.feature_columns = [str(c) for c in feature_columns] if feature_columns is not None else None
        self.val_path = str(val_path) if val_path is not None else None
        self.test_path = str(test_path) if test_path is not None else None
        self.num_classes_arg = int(num_classes) if num_classes is not None else None
        self._label_mapping: dict[str, int] | None = None
        self.tabular = Path(self.path).suffix.lower() != ".npz"
        transform = numeric_transform or ("standardize" if self.standardize else "none")
        # Validates the role options now (a typo in numeric_transform fails before any data is read).
        self._blank_preprocessor = TabularPreprocessor(
            label_column=self.label_column, feature_columns=self.feature_columns,
            categorical_columns=list(categorical_columns or ()), numeric_columns=list(numeric_columns or ()),
            drop_columns=list(drop_columns or ()), numeric_transform=transform,
        )
        self.preprocessor: TabularPreprocessor | None = None  # fitted at set-up (or loaded from a checkpoint)
        self._loaded_preprocessor = False

    # ---------------------------------------------------------------- the tabular pipeline
    @property
    def standardizes_features(self) -> bool:
        """Tables are scaled column by column by the preprocessor; only NPZ arrays use ``standardize``."""
        return not self.tabular

    @property
    def categorical_cardinalities(self) -> list[int]:
        """Cardinality of each categorical input (the last columns of ``x``); see the base class."""
        self._ensure_setup()
        return self.preprocessor.categorical_cardinalities_ if self.preprocessor is not None else []

    @property
    def feature_names(self) -> list[str] | None:
        """Name of each input column of ``x`` (None for NPZ arrays)."""
        self._ensure_setup()
        return self.preprocessor.output_names_ if self.preprocessor is not None else None

    def describe(self) -> str:
        """The table's schema: each column's role and why (empty for NPZ arrays)."""
        self._ensure_setup()
        return self.preprocessor.describe() if self.preprocessor is not None else ""

    def state_dict(self) -> dict[str, Any]:
        """The base statistics plus the fitted tabular preprocessing, as plain data."""
        state = super().state_dict()
        if self.preprocessor is not None:
            state["tabular"] = self.preprocessor.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's preprocessing: the inputs are then built exactly as in the run that saved it."""
        super().load_state_dict(state_dict)
        if "tabular" not in state_dict:
            return
        loaded = TabularPreprocessor.from_state_dict(state_dict["tabular"])
        if self.preprocessor is not None and loaded.state_dict() == self.preprocessor.state_dict():
            return  # the usual resume: the same data gave the same preprocessing
        self.preprocessor, self._loaded_preprocessor = loaded, True
        if self._is_setup:
            self._setup_splits()

    # ---------------------------------------------------------------- loading
    def load(self) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
        """Features, encoded labels and class names from ``path`` (all rows; NPZ or an all-numeric table)."""
        x, raw = read_table(self.path, self.label_column, self.feature_columns)
        assert raw is not None
        y, names = self._encode_labels(raw, self.path, main=True)
        return x, y, names

    def load_splits(self) -> tuple[Split, Split, Split]:
        """The splits: carved from ``path`` by the fractions, or read from ``val_path``/``test_path``."""
        if not self.tabular:
            return self._load_npz_splits()
        table = read_frame(self.path, self.label_column)
        y = self._labels(table, self.path, main=True)
        vf = 0.0 if self.val_path is not None else self.val_fraction
        tf = 0.0 if self.test_path is not None else self.test_fraction
        rows = self._split_rows(y, vf, tf)
        if not self._loaded_preprocessor:
            self.preprocessor = copy.deepcopy(self._blank_preprocessor).fit(table, rows["train"], source=self.path)
        pre = self.preprocessor
        assert pre is not None
        features = pre.transform_splits(table, rows, source=self.path)
        splits = {name: (torch.from_numpy(features[name]), y[torch.from_numpy(idx)]) for name, idx in rows.items()}
        del table, features
        for name, other in (("val", self.val_path), ("test", self.test_path)):
            if other is not None:
                table = read_frame(other, self.label_column)
                splits[name] = (torch.from_numpy(pre.transform(table, source=other)), self._labels(table, other))
        return splits["train"], splits["val"], splits["test"]

    def _labels(self, table: Any, path: str, main: bool = False) -> Tensor:
        """The encoded label column of a table read by :func:`read_frame`."""
        if self.label_column not in table:
            raise ValueError(f"label column {self.label_column!r} not found in {path}; "
                             f"available columns: {table.column_names}")
        raw = np.asarray(table[self.label_column])
        y, names = self._encode_labels(raw, path, main=main)
        if main:
            self._source_class_names = names
        return _as_targets(y, len(y), self.ignore_index, f"file {path}")

    def _load_npz_splits(self) -> tuple[Split, Split, Split]:
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
            xo, raw = read_table(p, self.label_column, self.feature_columns)
            assert raw is not None
            yo, _ = self._encode_labels(raw, p, main=False)
            xo_t = _as_features(xo, f"file {p}")
            return xo_t, _as_targets(yo, len(xo_t), self.ignore_index, f"file {p}")

        if self.val_path is not None:
            val = other(self.val_path)
        if self.test_path is not None:
            test = other(self.test_path)
        return train, val, test

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
                {v: i for i, v in enumerate(sorted(set(np.unique(raw[~missing].astype(str)).tolist())))}
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
            import pandas as pd

            keys = pd.Series(raw[~missing]).astype(str)
            codes = pd.Index(list(self._label_mapping)).get_indexer(keys)
            if (codes < 0).any():
                row = int(np.flatnonzero(~missing)[np.flatnonzero(codes < 0)[0]])
                raise ValueError(
                    f"label {str(raw[row])!r} at row {row} of {path} does not occur in {self.path}; "
                    f"known labels: {list(self._label_mapping)}"
                )
            y[~missing] = codes
            names: list[str] | None = list(self._label_mapping)
        else:
            vals = raw.astype(np.float64)
            frac = ~missing & (vals != np.round(vals))
            if frac.any():
                row = int(np.flatnonzero(frac)[0])
                raise ValueError(f"label {raw[row].item()!r} at row {row} of {path} is not a whole number")
            n_labelled = int((~missing).sum())
            too_big = ~missing & (vals >= max(n_labelled, self.num_classes_arg or 0))
            if main and too_big.any() and self.num_classes_arg is None:  # before anything sized by the largest label
                row = int(np.flatnonzero(too_big)[0])
                raise ValueError(
                    f"label {raw[row].item()!r} at row {row} of {path} is a class index larger than the number of "
                    f"labelled rows ({n_labelled}); labels must be class indices 0..K-1 (map them, or store them as "
                    "text: text labels are class names)"
                )
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


def read_frame(path: str | Path, label_column: str | None = None) -> Columns:
    """A CSV or Parquet file as :class:`~xentlit.data.tabular.Columns`, with one-line errors that name the file.

    The file is read batch by batch (pyarrow's streaming CSV reader; Parquet row groups): each batch's number
    columns go straight into growing numpy arrays (floats as float32, half the memory of float64) and the batch is
    dropped, so memory is bounded by the columns themselves, not by the file or pyarrow's buffers. A CSV column whose
    type the first block guessed wrong is read again wider.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    p = Path(path)
    suffix = _check_suffix("path", str(path))
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if p.stat().st_size == 0:
        raise ValueError(f"{path} is empty: expected a header line and rows")
    try:
        if suffix == ".parquet":
            parquet = pq.ParquetFile(p)
            columns = _collect(parquet.iter_batches(), parquet.schema_arrow, label_column, parquet.metadata.num_rows,
                               str(path))
        else:
            with pacsv.open_csv(p) as reader:
                schema = reader.schema
                try:
                    first = reader.read_next_batch()
                except StopIteration:
                    raise ValueError(f"{path} has a header but no rows") from None
            # rows in the file, from the first block (~1 MiB of it): an overestimate costs no memory (see _collect)
            expected = int(1.25 * first.num_rows * max(1.0, p.stat().st_size / pacsv.ReadOptions().block_size)) + 1
            types = {f.name: pa.float32() for f in schema if pa.types.is_floating(f.type) and f.name != label_column}
            for _ in range(2 * len(schema.names) + 1):
                try:
                    options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
                    with pacsv.open_csv(p, convert_options=options) as reader:
                        columns = _collect(reader, reader.schema, label_column, expected, str(path))
                    break
                except pa.ArrowInvalid as err:
                    column = _failed_column(str(err), schema.names)
                    if column is None:
                        raise
                    guessed = types.get(column, schema.field(column).type)
                    types[column] = pa.string() if pa.types.is_floating(guessed) else pa.float64()
            else:
                raise ValueError("column types kept changing")
    except (pa.ArrowInvalid, OSError) as err:
        message = str(err).splitlines()[0]
        raise ValueError(f"{path} cannot be read as {suffix[1:].upper()}: {message}") from None
    if columns.num_rows == 0:
        raise ValueError(f"{path} has a header but no rows")
    for name, values in columns.items():
        if suffix == ".csv" and values.dtype == object and len(values.dropna()) and isinstance(
                values.dropna().iloc[0], bytes):  # pyarrow's fallback for bytes that are not UTF-8
            raise ValueError(f"column {name!r} of {path} is not UTF-8 text (e.g. {values.dropna().iloc[0][:40]!r}); "
                             "save the file as UTF-8")
    return columns


def _collect(batches: Any, schema: Any, label_column: str | None, expected_rows: int, source: str) -> Columns:
    """Consume record batches into :class:`Columns`: number columns as numpy arrays, the rest as pandas Series.

    Number columns are copied batch by batch into arrays preallocated for ``expected_rows`` (an estimate: pages
    never written cost no memory, and an array that fills up doubles), so no batch outlives its own step.
    """
    import pyarrow as pa

    numeric = {f.name for f in schema if f.name != label_column and not pa.types.is_dictionary(f.type)
               and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))}
    _check_unique([str(n) for n in schema.names], source)
    growing = {name: _Growing(np.float32 if pa.types.is_float32(schema.field(name).type) else
                              np.float64 if pa.types.is_floating(schema.field(name).type) else np.int64,
                              expected_rows) for name in numeric}
    others: dict[str, list[Any]] = {name: [] for name in schema.names if name not in numeric}
    for batch in batches:
        for name, column in zip(schema.names, batch.columns):
            if name in numeric:
                growing[name].append(column.to_numpy(zero_copy_only=False))
            else:
                others[name].append(column)
        del batch
    pa.default_memory_pool().release_unused()  # the batches' buffers, kept by pyarrow's allocator for reuse
    columns = Columns()
    for name in schema.names:
        if name in numeric:
            columns[str(name)] = growing.pop(name).values()
        else:
            columns[str(name)] = pa.chunked_array(others.pop(name), type=schema.field(name).type).to_pandas()
    return columns


class _Growing:
    """A 1-D numpy array filled a batch at a time (integers switch to float64 when a batch brings missing values)."""

    def __init__(self, dtype: Any, capacity: int) -> None:
        self.data = np.empty(max(capacity, 16), dtype=dtype)
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        if values.dtype.kind == "f" and self.data.dtype.kind in "iu":
            self.data = self.data.astype(np.float64)
        end = self.size + len(values)
        if end > len(self.data):
            bigger = np.empty(max(end, 2 * len(self.data)), dtype=self.data.dtype)
            bigger[: self.size] = self.data[: self.size]
            self.data = bigger
        self.data[self.size : end] = values
        self.size = end

    def values(self) -> np.ndarray:
        return self.data[: self.size]


def _failed_column(message: str, names: list[str]) -> str | None:
    """The column a pyarrow CSV conversion error names ("In CSV column #3: ... conversion error ...")."""
    import re

    found = re.search(r"CSV column #(\d+).*conversion error", message)
    return names[int(found.group(1))] if found and int(found.group(1)) < len(names) else None


def read_table(
    path: str | Path,
    label_column: str | None = "label",
    feature_columns: Sequence[str] | None = None,
    require_label: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features, raw labels)`` of an all-numeric CSV, Parquet or NPZ file (errors name what is wrong).

    Features are every column except the label (or ``feature_columns``), in file order; for ``.npz`` the features
    are the array ``x`` (or ``feature_columns[0]``) and the labels the array ``label_column``. With
    ``require_label=False`` a missing label column is allowed (prediction inputs) and the labels are None. Tables
    with text, missing values or IDs go through :class:`FileDataModule`'s tabular pipeline instead.
    """
    p = Path(path)
    suffix = _check_suffix("path", str(path))
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if suffix == ".npz":
        return _read_npz(p, label_column, feature_columns, require_label)
    table = read_frame(p, label_column)
    columns = table.column_names
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
    non_numeric = [c for c in feats if np.asarray(table[c]).dtype.kind not in "biuf"]
    if non_numeric:
        raise ValueError(
            f"non-numeric feature column(s) in {path}: "
            + ", ".join(f"{c!r} ({np.asarray(table[c]).dtype})" for c in non_numeric)
        )
    x = np.column_stack([np.asarray(table[c], dtype=np.float64) for c in feats])
    return x, (np.asarray(table[label_column]) if has_label else None)


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
