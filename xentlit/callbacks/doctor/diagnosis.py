"""The findings of one fit and the checks that make them: each moment's checks called in registry order, each
code reported once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from xentlit.callbacks.doctor.checks import CHECKS
from xentlit.callbacks.doctor.checks.base import EVENTS, C, Check, Doctor
from xentlit.callbacks.doctor.findings import Finding, Verdict

log = logging.getLogger(__name__)


class Diagnosis:
    """A fresh instance of every registered check, and the findings they made (``verbose``: each logged as a
    warning when found)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.findings: list[Finding] = []
        self.checks: list[Check] = [kind() for kind in CHECKS]
        # the checks that judge each moment: those whose class overrides its hook
        self._listeners = {event: [c for c in self.checks if getattr(type(c), event) is not getattr(Check, event)]
                           for event in EVENTS}
        self._errors: set[str] = set()

    def has(self, *codes: str) -> bool:
        return any(f.code in codes for f in self.findings)

    def check(self, kind: type[C]) -> C:
        return next(c for c in self.checks if isinstance(c, kind))

    def dispatch(self, doctor: Doctor, trainer: pl.Trainer | None, event: str, *args: Any) -> list[str]:
        """Call every check of ``event``; the codes whose problem shows now (also those reported before)."""
        shown = []
        for check in self._listeners[event]:  # (on_step: every optimiser step, kept short)
            try:
                verdict = getattr(check, event)(doctor, *args)
            except Exception as err:
                self.skipped(f"the {check.code} check", err)
                continue
            if verdict is not None:
                shown.append(check.code)
                self.add(trainer, check, verdict)
        return shown

    def add(self, trainer: pl.Trainer | None, check: Check, verdict: Verdict) -> None:
        """Record the check's finding, unless its code was reported before."""
        if self.has(check.code):
            return
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        step = verdict.step if verdict.step is not None else int(trainer.global_step) if trainer is not None else 0
        finding = Finding(check.code, check.severity, verdict.stage, epoch, step, verdict.message, verdict.evidence)
        self.findings.append(finding)
        if self.verbose and trainer is not None:
            # Batch-level findings are this rank's own (and must be seen even if this rank then fails);
            # epoch-level ones are the same on every rank: rank 0 speaks for all.
            if check.local and trainer.world_size > 1:
                log.warning("ConvergenceDoctor (rank %d) %s", trainer.global_rank, finding.format())
            elif trainer.is_global_zero:
                log.warning("ConvergenceDoctor %s", finding.format())

    def safely(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a rank-local step; a diagnostic must never break training (collectives are never guarded)."""
        try:
            return fn(*args)
        except Exception as err:
            self.skipped(what, err)
            return None

    def skipped(self, what: str, err: Exception) -> None:
        """Say (once per ``what``) that a step of the diagnosis failed and was skipped."""
        if what not in self._errors:
            self._errors.add(what)
            log.warning("ConvergenceDoctor skipped %s: %s: %s", what, type(err).__name__, err)
