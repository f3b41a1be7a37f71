"""Per-step values on the host without stalling the device: the optimiser steps' loss and gradient norm (read
one step late on CUDA), the gradient norm itself, and scalars read together."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xentlit.callbacks.doctor.observations import GRAD_REFERENCE_STEPS

#: ``(step, loss, gradient norm)`` of the steps whose values are readable now
Ready = list[tuple[int, float | None, float | None]]


def to_host(values: list[Tensor]) -> list[float]:
    """Scalars (possibly on several devices) as floats, with one device-to-host copy per device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for device, index in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        host = torch.stack([values[i].reshape(()).to(dtype) for i in index]).cpu().tolist()
        for i, v in zip(index, host):
            out[i] = v
    return out


def grad_norm(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The 2-norm of all (dense) gradients of the optimiser's parameters, on their device."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None and not p.grad.is_sparse]
    if not grads:
        return None
    first = grads[0]
    if all(g.device == first.device and g.dtype == first.dtype for g in grads):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)


class StepReader:
    """A step's loss and gradient norm (each possibly ``None``) read on the host without stalling the device.

    CPU: read at once (there is no device to wait for). CUDA: copied into pinned host memory with
    ``non_blocking=True`` and an event recorded; the next step waits on that (old) event only, so the host never
    waits for the current step, and every DDP rank reads the values of the same step (identical decisions, no
    deadlock). Other accelerators (MPS, XLA, ...): kept on the device and read together at :meth:`flush` (epoch
    boundaries), one synchronisation per epoch.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, bool, Tensor, Any]] = []
        self._pinned: dict[int, list[Tensor]] = {}
        self._flip = 0

    def push(self, step: int, loss: Tensor | None, grad_norm: Tensor | None) -> Ready:
        """Queue this step's values; return those of the steps that are now readable."""
        if loss is None and grad_norm is None:
            return []
        first = loss if loss is not None else grad_norm
        assert first is not None
        if first.device.type == "cpu":
            return [(step, None if loss is None else loss.item(), None if grad_norm is None else grad_norm.item())]
        values = [v.reshape(()).to(torch.float32) for v in (loss, grad_norm) if v is not None]
        vec = torch.stack(values) if len(values) > 1 else values[0].reshape(1)
        if first.device.type != "cuda":
            self._pending.append((step, loss is not None, vec, None))
            return []
        ready = self.flush()
        ring = self._pinned.get(vec.numel())
        if ring is None:
            ring = self._pinned[vec.numel()] = [torch.empty(vec.numel(), pin_memory=True) for _ in range(2)]
        self._flip ^= 1
        host = ring[self._flip]
        host.copy_(vec, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((step, loss is not None, host, event))
        return ready

    def flush(self) -> Ready:
        """The values of every queued step (waits for the device)."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        ready: Ready = []
        for step, has_loss, values, event in pending:
            if event is not None:
                event.synchronize()
            read = values.tolist()
            loss = read[0] if has_loss else None
            ready.append((step, loss, read[-1] if len(read) > has_loss else None))
        return ready


class StepWatch:
    """The optimiser steps of a fit: counts them, measures the gradient norm on the first steps, the first step of
    every epoch and every ``every`` steps, and reads each step's loss and gradient norm (:class:`StepReader`)."""

    def __init__(self) -> None:
        self.step = 0  # the index of the next optimiser step
        self.every = 10
        self.measured = False  # whether the gradient norm was measured in this epoch
        self.on_cpu = True  # values are read at once (no device to wait for)
        self.reader = StepReader()
        self._norm: Tensor | None = None

    def start(self, step: int, every: int, device: torch.device) -> None:
        """Count from optimiser step ``step`` and measure the gradient norm every ``every`` steps."""
        self.step, self.every, self.on_cpu = step, max(every, 1), device.type == "cpu"

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> int:
        """Count the step (its index is returned) and measure its gradient norm when it is due."""
        step = self.step
        self.step += 1
        if step < GRAD_REFERENCE_STEPS or step % self.every == 0 or not self.measured:
            self.measured = True
            norm = grad_norm(optimizer)
            if norm is not None:  # (several steps' norms before one read: their root sum of squares)
                self._norm = norm if self._norm is None else torch.hypot(self._norm, norm)
        return step

    def read(self, step: int, loss: Tensor | None) -> Ready:
        """Queue the step's loss with the gradient norm measured since the last read; the steps readable now."""
        norm, self._norm = self._norm, None
        if self.on_cpu:  # (the common path, every step: kept short)
            if loss is None and norm is None:
                return []
            return [(step, None if loss is None else loss.item(), None if norm is None else norm.item())]
        return self.reader.push(step, loss, norm)
