"""What the doctor reports: a :class:`Finding` per code, built from a check's :class:`Verdict`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """One diagnosis: a stable ``code``, its ``severity``, where it was found, the evidence and the fix."""

    code: str
    severity: str
    stage: str
    epoch: int
    step: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        where = f"epoch {self.epoch}, step {self.step}, {self.stage}"
        return f"[{self.severity}] {self.code} ({where}): {self.message}"


@dataclass
class Verdict:
    """What a check found: the message (naming the fix) and the evidence; the doctor adds the code, severity and
    epoch. ``step`` defaults to the trainer's global step."""

    message: str
    evidence: dict[str, Any]
    stage: str = "train"
    step: int | None = None


def num(value: Any) -> Any:
    """A JSON-friendly, readable number (4 significant digits; NaN/inf as strings)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return float(f"{value:.4g}")


def evidence(**values: Any) -> dict[str, Any]:
    """The evidence of a finding: each value (or each item of a list) as :func:`num` writes it."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            out[key] = [num(v) for v in value]
        else:
            out[key] = num(value)
    return out
