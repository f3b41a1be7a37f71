"""The doctor's checks, one class per finding code, and :data:`CHECKS`, the one place they are registered.

Add a check: subclass :class:`~xentlit.callbacks.doctor.checks.base.Check` (its ``code``, ``severity``,
``title``, and the ``on_*`` moments it judges, each returning a
:class:`~xentlit.callbacks.doctor.findings.Verdict` or ``None``) in the module of its kind, and append it here.
The callback calls the checks of each moment in this order (a check may ask whether an earlier one reported:
``doctor.has(code)``), and :data:`~xentlit.callbacks.doctor.CODES` lists the codes in this order.
"""

from __future__ import annotations

from xentlit.callbacks.doctor.checks.base import Check
from xentlit.callbacks.doctor.checks.classes import AllIgnoredBatch, UnseenClass
from xentlit.callbacks.doctor.checks.collapse import MajorityCollapse
from xentlit.callbacks.doctor.checks.divergence import Divergence
from xentlit.callbacks.doctor.checks.inputs import NonFiniteInputs, UnscaledInputs
from xentlit.callbacks.doctor.checks.learning_rate import LearningRateTooLow
from xentlit.callbacks.doctor.checks.outputs import InitialLoss, SoftmaxBeforeLoss
from xentlit.callbacks.doctor.checks.overfitting import Overconfidence
from xentlit.callbacks.doctor.checks.targets import (FloatClassIndices, FloatOneHotTargets, IntegerOneHotTargets,
                                                     TargetOutOfRange)

CHECKS: tuple[type[Check], ...] = (
    SoftmaxBeforeLoss,  # before InitialLoss, which it explains
    InitialLoss,
    NonFiniteInputs,  # before the target checks: a batch's inputs are judged first
    UnscaledInputs,
    TargetOutOfRange,
    FloatClassIndices,
    FloatOneHotTargets,
    IntegerOneHotTargets,
    UnseenClass,
    AllIgnoredBatch,
    Divergence,
    LearningRateTooLow,
    MajorityCollapse,  # before Overconfidence, which is not judged while predictions collapse
    Overconfidence,
)

__all__ = ["CHECKS", "Check"]
