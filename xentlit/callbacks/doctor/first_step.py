"""What the doctor measures on the first training step: the logits' range and row sums, the module's own loss on
them and on uniform logits, and (through a forward hook) the first layer's response."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from xentlit.callbacks.doctor.observations import FirstStep
from xentlit.callbacks.doctor.statistics import flatten_classes
from xentlit.callbacks.doctor.steps import to_host


class FirstLayerProbe:
    """Forward hooks on every leaf module with weights, for one batch: the RMS of the first one's output."""

    def __init__(self) -> None:
        self.first: list[tuple[str, Tensor]] = []  # (name, output RMS on its device) of the first layer that ran
        self._hooks: list[Any] = []

    def install(self, pl_module: pl.LightningModule) -> None:
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in pl_module.modules()):
            return  # hooks would force a recompilation of a compiled module
        self.first = []

        def hook(name: str):
            def fn(module: nn.Module, args: Any, output: Any) -> None:
                if self.first:
                    return
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(out, Tensor) and out.is_floating_point() and out.numel() > 0:
                    o = out.detach().float()
                    o = torch.where(torch.isfinite(o), o, torch.zeros((), device=o.device))
                    self.first.append((name, o.pow(2).mean().sqrt()))
            return fn

        for name, module in pl_module.named_modules():
            if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
                self._hooks.append(module.register_forward_hook(hook(name)))

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def module_losses(pl_module: pl.LightningModule, logits: Tensor,
                  target: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The module's own loss on these logits and on uniform logits (label smoothing, weights included), from its
    ``compute_loss`` or its ``loss``/``criterion``/``loss_fn`` module; ``(None, None)`` if it has none."""
    if target is None:
        return None, None

    def mean_of(result: Any) -> Tensor | None:
        if isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, Tensor) for r in result):
            total, denominator = result
            return total / denominator.clamp_min(1e-12) if denominator.numel() == 1 else None
        return result if isinstance(result, Tensor) and result.numel() == 1 else None

    candidates = []
    fn = getattr(pl_module, "compute_loss", None)
    if callable(fn):
        candidates.append(fn)
    for name in ("loss", "criterion", "loss_fn"):
        attr = getattr(pl_module, name, None)
        if isinstance(attr, nn.Module):
            candidates.append(attr)
    for fn in candidates:
        try:
            with torch.no_grad():
                observed = mean_of(fn(logits, target))
                expected = mean_of(fn(torch.zeros_like(logits), target))
        except Exception:
            continue
        if observed is not None and expected is not None:
            return observed.detach(), expected.detach()
    return None, None


def first_step(pl_module: pl.LightningModule, logits: Tensor, target: Tensor | None, stats: Tensor | None,
               probe: FirstLayerProbe, step: int, inputs: dict[str, float] | None) -> FirstStep:
    """The first training step's observation (one host synchronisation); ``stats`` are its training statistics
    (``[nll_sum, labelled, ...]``, see :func:`~xentlit.callbacks.doctor.statistics.train_statistics`)."""
    lg, _ = flatten_classes(logits, target)
    c = lg.shape[1]
    lgf = lg.float()
    row_dev = (lgf.sum(dim=1) - 1.0).abs().amax()
    # the mean per-row standard deviation (as std(dim=1), whose CPU kernel is slow over a short row)
    ones = lgf.new_ones(c)
    centred = lgf - (lgf @ ones / c).unsqueeze(1)
    spread = (centred.square() @ ones / (c - 1)).sqrt().mean() if c > 1 else torch.zeros((), device=lgf.device)
    low, high = torch.aminmax(lgf)
    values = [low, high, row_dev, spread]
    names = ["min", "max", "row_dev", "spread"]
    if stats is not None:
        values += [stats[0].float(), stats[1].float()]
        names += ["nll_sum", "n_valid"]
    observed, expected = module_losses(pl_module, logits, target)
    if observed is not None and expected is not None:
        values += [observed.float().reshape(()), expected.float().reshape(())]
        names += ["module_loss", "module_uniform_loss"]
    if probe.first:
        values.append(probe.first[0][1].float())
        names.append("first_layer_rms")
    host = dict(zip(names, to_host(values)))
    ln_c = math.log(c)
    nll = host["nll_sum"] / host["n_valid"] if host.get("n_valid", 0) > 0 else None
    return FirstStep(step=step, num_classes=c, values=host, nll=nll, observed_loss=host.get("module_loss", nll),
                     expected_loss=host.get("module_uniform_loss", ln_c), inputs=inputs,
                     first_layer=probe.first[0][0] if probe.first else None)
