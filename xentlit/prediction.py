"""The inputs and label metrics of ``scripts/predict.py``: a file's rows prepared as the model was trained,
and metrics over the rows whose label the model knows."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from xentlit.console import say


def _prediction_inputs(cfg: DictConfig, run_cfg: DictConfig, info: dict[str, Any], label_column: str) -> tuple:
    """``(features, columns to copy through or None, raw labels or None)`` of the prediction input file."""
    import numpy as np
    import pandas as pd

    from xentlit.data import read_table
    from xentlit.data.files import read_frame
    from xentlit.data.tabular import TabularPreprocessor

    if info.get("tabular"):
        preprocessor = TabularPreprocessor.from_state_dict(info["tabular"])
        frame = read_frame(cfg.input, label_column)
        x = preprocessor.transform(frame, source=str(cfg.input))
        inputs = {c.name for c in preprocessor.columns_ if c.role != "dropped"}
        keep = [c for c in frame.column_names if c not in inputs]
        passthrough = pd.DataFrame({c: frame[c] for c in keep}) if keep else None
        labels = np.asarray(frame[label_column]) if label_column in frame else None
        return torch.from_numpy(x), passthrough, labels
    num_features = int(info["num_features"])
    x, labels = read_table(cfg.input, label_column=label_column,
                           feature_columns=run_cfg.get("data", {}).get("feature_columns"), require_label=False)
    if x.ndim != 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{cfg.input} has {x.shape[1] if x.ndim == 2 else x.shape} feature columns but the model in "
            f"{cfg.ckpt_path} was trained on {num_features}"
        )
    if not np.isfinite(x).all():
        row, col = map(int, np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"{cfg.input} has non-finite features, first at row {row}, column {col}")
    features = torch.as_tensor(x, dtype=torch.float32)
    if "feature_mean" in info:
        features = (features - info["feature_mean"].float()) / info["feature_std"].float()
    return features, None, labels


def _label_metrics(labels: Any, logits: torch.Tensor, class_names: list[str], label_column: str,
                   source: str) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and NLL over the rows whose label is one of the model's classes."""
    import pandas as pd
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_recall

    from xentlit.data.tabular import _category_keys

    keys = _category_keys(pd.Series(labels))  # as the class names were made: 3.0 and "3" are class "3"
    codes = pd.Index(class_names).get_indexer(keys)  # -1: missing or not a class of the model
    known = codes >= 0
    result: dict[str, Any] = {"rows": int(len(codes)), "rows_with_known_label": int(known.sum())}
    unknown = keys[(~known) & keys.notna().to_numpy()]
    if len(unknown):
        result["unknown_labels"] = sorted(set(unknown.tolist()))[:10]
        say(f"{len(unknown)} row(s) of {source} have a {label_column!r} the model does not know "
              f"(e.g. {unknown.iloc[0]!r}); metrics leave them out")
    if not known.any():
        return result
    target = torch.as_tensor(codes[known], dtype=torch.long)
    out = logits[torch.as_tensor(known)]
    c = len(class_names)
    result.update({
        "acc": float(multiclass_accuracy(out, target, c, average="micro")),
        "balanced_acc": float(multiclass_recall(out, target, c, average="macro")),
        "f1_macro": float(multiclass_f1_score(out, target, c, average="macro")),
        "nll": float(torch.nn.functional.cross_entropy(out.double(), target)),
    })
    return result
