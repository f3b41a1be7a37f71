"""The tabular pipeline: column roles inferred from a real table, fitted on the training rows, stored as plain data.

:class:`TabularPreprocessor` follows scikit-learn's fitted-estimator conventions (``fit`` records
``feature_names_in_``; ``transform`` matches columns by name, in any order, and names a missing one) and
pytorch-tabular's column roles. It turns a table (pandas DataFrame or pyarrow Table) into one float32 matrix::

    [numeric and binary inputs ..., missing-value indicators ..., categorical codes ...]

- numeric: missing values get the training median, then the numeric transform (``standardize`` with training
  mean and std, ``quantile_normal`` to a standard normal through training quantiles, or ``none``);
- binary (booleans, 0/1 columns): imputed, never rescaled;
- an indicator column ``<name>_missing`` (0/1) for every numeric or binary column with missing training values;
- categorical: code ``1..K`` for the K training categories, ``0`` for a missing or unseen value; the network
  embeds the last ``len(categorical_cardinalities_)`` columns (cardinality ``K + 1`` each).

Everything fitted is plain data (:meth:`state_dict`): it goes into checkpoints that load with
``torch.load(weights_only=True)`` and into ``schema.json`` in the run directory.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Columns", "ColumnSpec", "TabularPreprocessor", "NUMERIC_TRANSFORMS"]

NUMERIC_TRANSFORMS = ("standardize", "quantile_normal", "none")
ROLES = ("numeric", "binary", "categorical", "dropped")
STATE_VERSION = 1
# A column named like an identifier (patient_id, uuid, row_id, Id, key) whose values are all distinct.
_ID_NAME = re.compile(r"(^|[_\W])(id|ids|uuid|guid|key)$|^(id|uuid|guid)([_\W]|$)|^(index|row|rownum|row_number)$",
                      re.IGNORECASE)
_MAX_QUANTILES = 1000
_BLOCK = 16  # columns transformed together (see transform_splits)
_HIGH_CARDINALITY_MIN = 20  # a text column is dropped as free text when it has more distinct values than this
_HIGH_CARDINALITY_RATIO = 0.5  # ... and they make up more than this share of its values


@dataclass
class ColumnSpec:
    """One input column: its role, why, and what was fitted for it on the training rows."""

    name: str
    role: str
    reason: str
    kind: str = ""  # the column's kind in the table: number, integer, boolean, text, datetime
    missing: int = 0  # missing training values
    fill: float | None = None  # numeric/binary: the imputed value (training median)
    indicator: bool = False  # numeric/binary: a <name>_missing input follows
    center: float = 0.0  # numeric: subtracted ...
    scale: float = 1.0  # ... then divided by (standardize)
    quantiles: list[float] = field(default_factory=list)  # numeric: quantile_normal's training quantiles
    categories: list[str] = field(default_factory=list)  # categorical: code i + 1 is categories[i]


class Columns(dict):
    """A table as ``name -> 1-D column`` (numpy array or pandas Series), in file order: what
    :func:`~xentlit.data.files.read_frame` returns, and one of the table types the preprocessor takes."""

    @property
    def column_names(self) -> list[str]:
        return [str(name) for name in self]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.values()))) if self else 0


def _column_names(table: Any) -> list[str]:
    return [str(c) for c in (table.column_names if hasattr(table, "column_names") else table.columns)]


def _series(table: Any, name: str, rows: np.ndarray | None) -> pd.Series:
    """Column ``name`` (the given rows) of :class:`Columns`, a pandas DataFrame or a pyarrow Table, as a Series."""
    if isinstance(table, Columns):
        column = table[name]
        if isinstance(column, np.ndarray):
            return pd.Series(column if rows is None else column[rows])
        return column.iloc[rows].reset_index(drop=True) if rows is not None else column
    if hasattr(table, "column_names"):  # pyarrow.Table: convert one column (and only the rows asked for)
        column = table.column(name)
        if rows is not None:
            column = column.take(rows)
        return column.to_pandas()
    column = table[name]
    return column.iloc[rows].reset_index(drop=True) if rows is not None else column.reset_index(drop=True)


def _kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "boolean"
    if isinstance(s.dtype, pd.CategoricalDtype):
        return "text"
    if pd.api.types.is_datetime64_any_dtype(s) or pd.api.types.is_timedelta64_dtype(s):
        return "datetime"
    if pd.api.types.is_integer_dtype(s):
        return "integer"
    if pd.api.types.is_numeric_dtype(s):
        return "number"
    present = s.dropna()
    if len(present) and isinstance(present.iloc[0], (bool, np.bool_)) and present.map(type).isin([bool, np.bool_]).all():
        return "boolean"  # booleans with missing values arrive as objects
    if len(present) and isinstance(present.iloc[0], datetime.date):  # pyarrow's date32 arrives as datetime.date
        return "datetime"
    return "text"


def _as_numbers(s: pd.Series, name: str, source: str, rows: np.ndarray | None) -> np.ndarray:
    """Float64 values with NaN for missing ones; a clear error for text or infinities."""
    if _kind(s) == "text":
        present = s.dropna()
        numbers = pd.to_numeric(present, errors="coerce")
        bad = numbers.isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            row = _row(present.index[i], rows)
            raise ValueError(f"column {name!r} of {source} holds text ({present.iloc[i]!r} at row {row}) but is a "
                             "numeric input of the model: expected a number or an empty cell")
        s = pd.to_numeric(s, errors="coerce")
    values = s.to_numpy(dtype=np.float64, na_value=np.nan)
    if not values.flags.writeable:  # a view of pyarrow's buffers; imputation writes into it
        values = values.copy()
    inf = np.isinf(values)
    if inf.any():
        row = _row(int(np.flatnonzero(inf)[0]), rows)
        raise ValueError(f"column {name!r} of {source} has an infinite value ({values[inf][0]}) at row {row}; "
                         "missing values (empty, NA, NaN) are imputed but infinities are not: expected a finite number")
    return values


def _row(i: int, rows: np.ndarray | None) -> int:
    """The file's row number of position ``i`` of a column read for ``rows``."""
    return int(rows[i]) if rows is not None else int(i)


def _category_keys(s: pd.Series) -> pd.Series:
    """Values as category strings (None where missing); whole numbers print without '.0' so 3 and 3.0 agree."""
    if _kind(s) in ("integer", "number"):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        keys = [None if np.isnan(x) else (str(int(x)) if x == round(x) and abs(x) < 2**53 else repr(float(x)))
                for x in v]
        return pd.Series(keys, dtype=object)
    keys = s.astype(object).where(s.notna(), None)
    if pd.api.types.infer_dtype(keys, skipna=True) in ("string", "empty"):
        return keys
    return keys.map(lambda x: None if x is None else str(x))


def _infer_role(name: str, s: pd.Series, kind: str) -> tuple[str, str]:
    """``(role, reason)`` of a column nobody declared, from its training values."""
    present = s.dropna()
    if len(present) == 0:
        return "dropped", "no value in the training rows"
    if kind == "datetime":
        return "dropped", "date/time column: derive numeric features from it (year, day of week, ...)"
    if kind == "boolean":
        return "binary", "boolean"
    if kind in ("integer", "number"):
        v = present.to_numpy(dtype=np.float64)
        lo, hi = float(v.min()), float(v.max())
        if lo == hi and len(present) == len(s):
            return "dropped", f"constant: every training value is {lo:g}"
        whole = kind == "integer" or bool(np.all(v == np.round(v)))
        if whole and len(present) == len(s) and len(v) > 1:
            distinct = len(np.unique(v)) == len(v)
            if distinct and _ID_NAME.search(name):
                return "dropped", "ID-like: an identifier's name and every value distinct"
            if distinct and kind == "integer" and bool(np.all(np.diff(v) > 0)):
                return "dropped", "ID-like: a row number (distinct integers increasing down the file)"
        if bool(np.all((v == 0) | (v == 1))):
            return "binary", "two values, 0 and 1"
        return "numeric", kind
    keys = _category_keys(present)
    n_distinct = int(keys.nunique())
    if n_distinct == 1 and len(present) == len(s):
        return "dropped", f"constant: every training value is {keys.iloc[0]!r}"
    if n_distinct == len(present) and len(present) > 1 and (_ID_NAME.search(name) or len(present) > _HIGH_CARDINALITY_MIN):
        return "dropped", "ID-like: every value distinct"
    if n_distinct > _HIGH_CARDINALITY_MIN and n_distinct > _HIGH_CARDINALITY_RATIO * len(present):
        return "dropped", (f"free text: {n_distinct} distinct values in {len(present)} rows "
                           "(list it in categorical_columns to embed it anyway)")
    return "categorical", f"text with {n_distinct} distinct values"


class TabularPreprocessor:
    """Column roles, imputation, numeric transform and category codes, fitted on training rows.

    Args:
        label_column: never an input.
        feature_columns: the only candidate inputs (default: every column but the label).
        categorical_columns / numeric_columns / drop_columns: roles set by the user; the rest are inferred
            (:meth:`describe` says which and why).
        numeric_transform: ``standardize``, ``quantile_normal`` or ``none`` (numeric columns only).
    """

    def __init__(
        self,
        label_column: str | None = None,
        feature_columns: Sequence[str] | None = None,
        categorical_columns: Sequence[str] = (),
        numeric_columns: Sequence[str] = (),
        drop_columns: Sequence[str] = (),
        numeric_transform: str = "standardize",
    ) -> None:
        if numeric_transform not in NUMERIC_TRANSFORMS:
            raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}, got {numeric_transform!r}")
        declared = {"categorical_columns": categorical_columns, "numeric_columns": numeric_columns,
                    "drop_columns": drop_columns}
        seen: dict[str, str] = {}
        for option, names in declared.items():
            for name in names:
                if name in seen and seen[name] != option:
                    raise ValueError(f"column {name!r} is in both {seen[name]} and {option}: give it one role")
                seen[name] = option
        if label_column is not None and label_column in seen:
            raise ValueError(f"{seen[label_column]} names the label column {label_column!r}")
        self.label_column = label_column
        self.feature_columns = [str(c) for c in feature_columns] if feature_columns is not None else None
        self.categorical_columns = [str(c) for c in categorical_columns]
        self.numeric_columns = [str(c) for c in numeric_columns]
        self.drop_columns = [str(c) for c in drop_columns]
        self.numeric_transform = numeric_transform
        self.feature_names_in_: list[str] | None = None
        self.columns_: list[ColumnSpec] = []

    # ------------------------------------------------------------------------------------------ fitting
    def fit(self, table: Any, rows: np.ndarray | None = None, source: str = "the table") -> TabularPreprocessor:
        """Infer roles and fit imputation, transforms and categories on ``rows`` of ``table`` (the training rows)."""
        names = _column_names(table)
        _check_unique(names, source)
        wanted = [*self.categorical_columns, *self.numeric_columns, *self.drop_columns, *(self.feature_columns or [])]
        missing = [c for c in dict.fromkeys(wanted) if c not in names]
        if missing:
            raise ValueError(f"column(s) {missing} named in the data options are not in {source}; "
                             f"its columns: {names}")
        self.feature_names_in_ = [c for c in names if c != self.label_column]
        if not self.feature_names_in_:
            raise ValueError(f"{source} has no columns besides the label {self.label_column!r}")
        self.columns_ = [self._fit_column(name, _series(table, name, rows), source, rows)
                         for name in self.feature_names_in_]
        if not any(c.role != "dropped" for c in self.columns_):
            reasons = "; ".join(f"{c.name}: {c.reason}" for c in self.columns_)
            raise ValueError(f"no usable input column in {source} ({reasons}); set categorical_columns or "
                             "numeric_columns to keep some")
        return self

    def _fit_column(self, name: str, s: pd.Series, source: str, rows: np.ndarray | None) -> ColumnSpec:
        kind = _kind(s)
        if name in self.drop_columns:
            role, reason = "dropped", "drop_columns"
        elif self.feature_columns is not None and name not in self.feature_columns:
            role, reason = "dropped", "not in feature_columns"
        elif name in self.categorical_columns:
            role, reason = "categorical", "categorical_columns"
        elif name in self.numeric_columns:
            role, reason = "numeric", "numeric_columns"
        else:
            role, reason = _infer_role(name, s, kind)
        spec = ColumnSpec(name=name, role=role, reason=reason, kind=kind, missing=int(s.isna().sum()))
        if role == "categorical":
            keys = _category_keys(s).dropna()
            spec.categories = sorted(keys.unique().tolist())
        elif role in ("numeric", "binary"):
            v = _as_numbers(s, name, source, rows)
            present = v[~np.isnan(v)]
            if len(present) == 0:
                raise ValueError(f"column {name!r} of {source} has no value in the training rows; "
                                 "drop it (drop_columns) or provide values")
            spec.fill = float(np.median(present))
            spec.indicator = bool(len(present) < len(v))
            if role == "numeric" and self.numeric_transform == "standardize":
                spec.center = float(present.mean())
                std = float(present.std())
                spec.scale = std if std > 1e-12 * max(abs(spec.center), 1.0) else 1.0
            elif role == "numeric" and self.numeric_transform == "quantile_normal":
                levels = np.linspace(0.0, 1.0, min(_MAX_QUANTILES, len(present)))
                spec.quantiles = np.quantile(present, levels).tolist()
        return spec

    # -------------------------------------------------------------------------------------- transforming
    def transform(self, table: Any, rows: np.ndarray | None = None, source: str = "the table") -> np.ndarray:
        """The float32 input matrix of ``rows`` of ``table``; columns are matched by name, extra ones ignored."""
        return self.transform_splits(table, {"rows": rows}, source)["rows"]

    def transform_splits(self, table: Any, splits: dict[str, np.ndarray | None],
                         source: str = "the table") -> dict[str, np.ndarray]:
        """One float32 input matrix per entry of ``splits`` (name -> row indices, None for all rows), reading each
        column of ``table`` once."""
        self._check_fitted()
        names = _column_names(table)
        _check_unique(names, source)
        used = [c for c in self.columns_ if c.role != "dropped"]
        absent = [c.name for c in used if c.name not in names]
        if absent:
            raise ValueError(f"{source} lacks column(s) {absent} that the model was trained on; "
                             f"its columns: {names}")
        n_rows = table.num_rows if hasattr(table, "num_rows") else len(table)
        out = {name: np.empty((n_rows if idx is None else len(idx), self.num_features), dtype=np.float32)
               for name, idx in splits.items()}
        dense = [c for c in used if c.role in ("numeric", "binary")]
        indicator_at = {c.name: len(dense) + k for k, c in enumerate(c for c in dense if c.indicator)}
        for first in range(0, len(dense), _BLOCK):
            # Columns are computed into a column-major block, then copied into the row-major matrix a block at a
            # time: writing one column straight into it would touch every cache line of the matrix per column.
            block = dense[first : first + _BLOCK]
            temps = {name: np.empty((m.shape[0], len(block)), dtype=np.float32, order="F") for name, m in out.items()}
            for k, spec in enumerate(block):
                values = _as_numbers(_series(table, spec.name, None), spec.name, source, None)
                for name, idx in splits.items():
                    v = values if idx is None else values[idx]
                    nan = np.isnan(v)
                    if spec.name in indicator_at:
                        out[name][:, indicator_at[spec.name]] = nan
                    v = np.where(nan, spec.fill, v)
                    temps[name][:, k] = self._numeric(spec, v) if spec.role == "numeric" else v
            for name, temp in temps.items():
                out[name][:, first : first + len(block)] = temp
        start = len(dense) + len(indicator_at)
        for j, spec in enumerate(c for c in used if c.role == "categorical"):
            codes = pd.Index(spec.categories).get_indexer(_category_keys(_series(table, spec.name, None))) + 1
            for name, idx in splits.items():  # code 0: missing or unseen
                out[name][:, start + j] = codes if idx is None else codes[idx]
        return out

    def _numeric(self, spec: ColumnSpec, v: np.ndarray) -> np.ndarray:
        if spec.quantiles:
            q = np.asarray(spec.quantiles)
            levels = np.linspace(0.0, 1.0, len(q))
            # scikit-learn's QuantileTransformer: the mean of interpolating up and down handles repeated quantiles
            p = 0.5 * (np.interp(v, q, levels) - np.interp(-v, -q[::-1], -levels[::-1]))
            from scipy.special import ndtri

            return ndtri(np.clip(p, 1e-7, 1 - 1e-7))
        return (v - spec.center) / spec.scale

    # ------------------------------------------------------------------------------------------ describing
    @property
    def num_features(self) -> int:
        """Width of the matrix :meth:`transform` returns."""
        return len(self.output_names_)

    @property
    def output_names_(self) -> list[str]:
        """Name of each output column: inputs, then ``<name>_missing`` indicators, then categorical codes."""
        self._check_fitted()
        dense = [c for c in self.columns_ if c.role in ("numeric", "binary")]
        return ([c.name for c in dense] + [f"{c.name}_missing" for c in dense if c.indicator]
                + [c.name for c in self.columns_ if c.role == "categorical"])

    @property
    def categorical_cardinalities_(self) -> list[int]:
        """``K + 1`` per categorical column (code 0 is missing or unseen), in output order."""
        self._check_fitted()
        return [len(c.categories) + 1 for c in self.columns_ if c.role == "categorical"]

    def describe(self) -> str:
        """The inferred schema, one line per column: name, role, why, and what was fitted."""
        self._check_fitted()
        width = max(len(c.name) for c in self.columns_)
        lines = []
        for c in self.columns_:
            detail = []
            if c.role == "categorical":
                detail.append(f"{len(c.categories)} categories + missing/unseen")
            if c.missing:
                detail.append(f"{c.missing} missing" + (f", imputed {c.fill:g} + indicator" if c.indicator else ""))
            extra = f" [{'; '.join(detail)}]" if detail else ""
            lines.append(f"  {c.name:<{width}}  {c.role:<11}  {c.reason}{extra}")
        if self.label_column is not None:
            lines.append(f"  {self.label_column:<{width}}  {'label':<11}  label_column")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything fitted, as plain data (str, float, int, bool, lists, dicts): safe for checkpoints and JSON."""
        self._check_fitted()
        return {
            "version": STATE_VERSION,
            "label_column": self.label_column,
            "numeric_transform": self.numeric_transform,
            "feature_names_in": list(self.feature_names_in_ or []),
            "columns": [asdict(c) for c in self.columns_],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TabularPreprocessor:
        """A fitted preprocessor from :meth:`state_dict`'s output (checked: the state comes from a file)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a tabular preprocessing state of version {STATE_VERSION}")
        pre = cls(label_column=state["label_column"], numeric_transform=state["numeric_transform"])
        known = set(ColumnSpec.__dataclass_fields__)
        columns = []
        for entry in state["columns"]:
            if not isinstance(entry, dict) or not set(entry) <= known or entry.get("role") not in ROLES:
                raise ValueError(f"bad column entry in the tabular state: {entry!r}")
            columns.append(ColumnSpec(**entry))
        pre.columns_ = columns
        pre.feature_names_in_ = [str(n) for n in state["feature_names_in"]]
        return pre

    def _check_fitted(self) -> None:
        if self.feature_names_in_ is None:
            raise RuntimeError("this TabularPreprocessor is not fitted yet: call fit(table) first")


def _check_unique(names: list[str], source: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{source} has two columns named {name!r}; column names must be unique")
        seen.add(name)
