"""Global magnitude pruning, written as a user would write a method outside autoslim's tree.

Its search space is ``toy_magnitude.yaml`` beside this module (the default place for a method's knobs).
"""

from __future__ import annotations

import torch
from torch import nn

from autoslim import Callback, CompressionResult, Method


class KeepZeros(Callback):
    """Re-applies the pruning masks after every optimizer step, so fine-tuning keeps the zeros."""

    def __init__(self, weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        self.weights, self.masks = weights, masks

    @torch.no_grad()
    def on_step_end(self, model, step) -> None:
        for w, m in zip(self.weights, self.masks):
            w.mul_(m)


class Magnitude(Method):
    """Train, zero the fraction ``amount`` of conv/linear weights smallest in magnitude, fine-tune; ends sparse."""

    name = "toy_magnitude"

    def compress(self, model: nn.Module, ctx, params) -> CompressionResult:
        ctx.train(model, phase="train")
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        flat = torch.cat([w.detach().abs().flatten() for w in weights])
        k = max(1, int(params["amount"] * len(flat)))
        threshold = flat.kthvalue(k).values
        keep = KeepZeros(weights, [(w.detach().abs() > threshold).to(w.dtype) for w in weights])
        keep.on_step_end(model, 0)
        ctx.train(model, epochs=params["finetune_epochs"], phase="finetune", lr_scale=params["lr_scale"],
                  callbacks=[keep])
        return CompressionResult(model, sparse=True, info={"threshold": float(threshold)})
