"""Lightning callbacks of xentlit, one concern per subpackage or module (as Lightning's own ``callbacks``).

- :class:`ConvergenceDoctor` (:mod:`xentlit.callbacks.doctor`): explains why a cross-entropy loss does not go down.
"""

from __future__ import annotations

from xentlit.callbacks.doctor import CODES, DIAGNOSIS_FILE, ConvergenceDoctor, Finding

__all__ = ["CODES", "DIAGNOSIS_FILE", "ConvergenceDoctor", "Finding"]
