"""The last healthy weights, kept on the CPU so that divergence can put them back."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


class WeightSnapshot:
    """A CPU copy of a module's parameters and buffers, taken at healthy epoch boundaries (one copy into the
    buffers of the previous snapshot), and restored on divergence. On request (:attr:`measure_change`) the next
    snapshot also measures how far the parameters moved since the last one (:attr:`weight_change`, relative)."""

    def __init__(self) -> None:
        self.saved: list[Tensor] | None = None
        self.step = -1  # the global step the saved weights are from
        self.measure_change = False
        self.weight_change: float | None = None
        self._tensors: tuple[list[Tensor], int] | None = None

    def _state_tensors(self, pl_module: pl.LightningModule, fresh: bool = False) -> tuple[list[Tensor], int]:
        """Parameters then buffers (what divergence must restore), and how many are parameters (cached)."""
        if fresh or self._tensors is None:
            params = list(pl_module.parameters())
            self._tensors = (params + list(pl_module.buffers()), len(params))
        return self._tensors

    def take(self, pl_module: pl.LightningModule, step: int, check: bool = True) -> None:
        """Copy the weights to CPU if they are finite (``check``), and measure the change if asked to."""
        if self.step == step and self.saved is not None:
            return
        tensors, n_params = self._state_tensors(pl_module)
        params = [p.detach() for p in tensors[:n_params] if p.is_floating_point()]
        if check and params:
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
                return
        old = self.saved
        reuse = (old is not None and not self.measure_change and len(old) == len(tensors)
                 and all(o.shape == t.shape and o.dtype == t.dtype for o, t in zip(old, tensors)))
        if reuse:  # the common case: one copy into the buffers of the previous snapshot
            assert old is not None
            with torch.no_grad():
                torch._foreach_copy_(old, [t.detach() for t in tensors])
            self.step = step
            return
        new = [t.detach().to("cpu", copy=True) for t in tensors]
        if self.measure_change and old is not None and len(old) == len(new):
            self.measure_change = False
            pairs = [(n, o) for n, o in zip(new[:n_params], old[:n_params])
                     if n.is_floating_point() and n.shape == o.shape]
            if pairs:
                cur, prev = [n for n, _ in pairs], [o for _, o in pairs]
                delta = torch.stack(torch._foreach_norm(torch._foreach_sub(cur, prev))).norm()
                base = torch.stack(torch._foreach_norm(prev)).norm()
                self.weight_change = float(delta / base.clamp_min(1e-12))
        self.saved = new
        self.step = step

    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """Put the saved weights back and clear the optimisers' (possibly NaN) state; the step they are from
        (``None``: nothing saved)."""
        tensors, _ = self._state_tensors(pl_module, fresh=True)
        if self.saved is None or len(self.saved) != len(tensors):
            return None
        with torch.no_grad():
            for target, saved in zip(tensors, self.saved):
                if target.shape == saved.shape:
                    target.copy_(saved)
        for opt in trainer.optimizers:
            opt.state.clear()
        return self.step

    def take_change(self) -> float | None:
        """The weight change measured since the last call, if any."""
        change, self.weight_change = self.weight_change, None
        return change
