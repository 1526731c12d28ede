"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", 2017) as an autoslim method.

Train, then in every group of channels that can leave together remove the fraction ``amount`` of filters
whose weights have the smallest L1 norm (summed over the group's producers), then fine-tune. What to remove
(the L1 norms) is this module's; which channels may go under the study's ``pruning:`` rules, and the
removal itself, are autoslim's (:func:`autoslim.selection.select`, :mod:`autoslim.surgery`). Its knobs are
``l1norm.yaml`` beside this module.
"""

from __future__ import annotations

import torch
from torch import nn

from autoslim import CompressionResult, Method
from autoslim.config import PruningConfig
from autoslim.errors import UsageError
from autoslim.selection import prunable, select
from autoslim.surgery import channel_groups, remove_channels


def l1_norms(model: nn.Module, group) -> torch.Tensor:
    """Each output channel's L1 norm, summed over the producers that share it."""
    modules = dict(model.named_modules())
    return sum(modules[p].weight.detach().abs().flatten(1).sum(1) for p in group.producers)


class L1Norm(Method):
    """Remove the filters of smallest L1 norm in every layer, then fine-tune."""

    name = "l1norm"
    structured = True  # removes channels: the study's pruning rules (ignore, round_to) apply

    def check(self, model, *, example_input, params, pruning: PruningConfig | None = None) -> None:
        if not prunable(channel_groups(model, example_input=example_input), pruning or PruningConfig()):
            raise UsageError(f"l1norm: {type(model).__name__} has no group of channels it may remove")

    def compress(self, model: nn.Module, ctx, params) -> CompressionResult:
        ctx.train(model, phase="train")
        example, images = ctx.examples(2), ctx.examples(64)
        groups = channel_groups(model, example_input=example)
        scores = {g.name: l1_norms(model, g) for g in groups}
        smallest = {n: s <= s.quantile(params["amount"]) for n, s in scores.items()}
        keep = select(groups, scores, ctx.pruning, remove=smallest).keep
        with torch.no_grad():
            before = model.eval()(images)
            small = remove_channels(model, keep, example_input=example)
            change = float((small.eval()(images) - before).norm() / before.norm())
        removed = {g.name: g.size - len(keep[g.name]) for g in groups if g.name in keep}
        ctx.log(f"l1norm: removed {sum(removed.values())} filters; output change before fine-tuning {change:.3g}")
        ctx.train(small, epochs=params["finetune_epochs"], phase="finetune", lr_scale=params["lr_scale"])
        return CompressionResult(small, info={"removed": removed, "output_change": change})
