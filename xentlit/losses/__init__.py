"""Cross-entropy and its variants, one module each: `CrossEntropyLoss` (base.py) holds the options, validation
and the exact (sum, denominator) split; each variant (focal.py, poly1.py, ...) only states its formula through the
base class's hooks on log-probabilities. Pure PyTorch: nothing here imports Lightning.

Add a loss: a module with a `CrossEntropyLoss` subclass overriding `class_loss` (and/or `row_loss`,
`class_factor`, `logit_offset`), an entry in `LOSSES`, and a ``conf/loss/<name>.yaml``.
"""

from xentlit.losses.active_passive import ActivePassiveLoss
from xentlit.losses.base import REDUCTIONS, CrossEntropyLoss
from xentlit.losses.confidence_penalty import ConfidencePenaltyLoss
from xentlit.losses.focal import FocalLoss
from xentlit.losses.functional import cross_entropy
from xentlit.losses.generalized_ce import GeneralizedCrossEntropyLoss
from xentlit.losses.ldam import LDAMLoss
from xentlit.losses.logit_adjusted import LogitAdjustedLoss
from xentlit.losses.poly1 import Poly1Loss
from xentlit.losses.symmetric_ce import SymmetricCrossEntropyLoss
from xentlit.losses.validation import SOFT_TARGET_TOLERANCE
from xentlit.losses.weights import WEIGHT_STRATEGIES, class_weights

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "SOFT_TARGET_TOLERANCE",
    "WEIGHT_STRATEGIES",
    "ActivePassiveLoss",
    "ConfidencePenaltyLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "GeneralizedCrossEntropyLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "Poly1Loss",
    "SymmetricCrossEntropyLoss",
    "class_weights",
    "cross_entropy",
]

# Config name -> loss class: every entry gets a structured-config schema (xentlit/config.py) and a
# `conf/loss/<name>.yaml`. Presets: "class_balanced" is the base class with class_weights="effective_number"
# (Cui et al. 2019), "nfl_rce" the active-passive loss with gamma=0.5, "ldam_drw" LDAM with deferred re-weighting.
LOSSES: dict[str, type[CrossEntropyLoss]] = {
    "cross_entropy": CrossEntropyLoss,
    "class_balanced": CrossEntropyLoss,
    "focal": FocalLoss,
    "confidence_penalty": ConfidencePenaltyLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "poly1": Poly1Loss,
    "symmetric_ce": SymmetricCrossEntropyLoss,
    "generalized_ce": GeneralizedCrossEntropyLoss,
    "nce_rce": ActivePassiveLoss,
    "nfl_rce": ActivePassiveLoss,
    "ldam": LDAMLoss,
    "ldam_drw": LDAMLoss,
}
