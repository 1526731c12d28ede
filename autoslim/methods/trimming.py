"""Network Trimming (Hu, Peng, Tai, Tang 2016, arXiv 1607.03250): remove channels of high APoZ.

APoZ (average percentage of zeros) of output channel c, measured after its
activation, in eval mode, over N held-out examples and M spatial positions::

    APoZ_c = #{exact zeros in channel c} / (N * M)

Each round removes, in every target layer, the channels whose APoZ exceeds
``mean + alpha * std`` of the layer (rule ``std``, our reading of the paper's
"one standard deviation above the mean"; unverified, hence ``alpha`` is a
knob) or the floor of ``fraction`` x channels with the highest APoZ (rule
``fraction``), physically (:mod:`autoslim.surgery`), then retrains from the
surviving weights. ``layers: highest`` trims only the layer of highest mean
APoZ per round, the paper's order; ``all`` trims every layer. A layer always
keeps at least one channel. Statistics are collected on the validation images
(labels are not used), never on a single batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from autoslim.data import Split, batches
from autoslim.methods.base import CompressionResult, Method, TrialContext, register_method
from autoslim.surgery import channel_groups, remove_channels


@torch.no_grad()
def apoz(model: nn.Module, split: Split, activations: Mapping[str, str], *, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """APoZ of every channel at the outputs of ``activations`` ({group name: module name}) over ``split``."""
    modules = dict(model.named_modules())
    zeros: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(group):
        def fn(module, inputs, out):
            flat = out.transpose(0, 1).reshape(out.shape[1], -1)  # channels x (N * M)
            zeros[group] = zeros.get(group, 0) + (flat == 0).sum(1).double()
            counts[group] = counts.get(group, 0) + flat.shape[1]
        return fn

    handles = [modules[act].register_forward_hook(hook(g)) for g, act in activations.items()]
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches(split, batch_size=batch_size):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {g: (zeros[g] / counts[g]).float().cpu() for g in activations}


def channels_to_keep(scores: torch.Tensor, *, rule: str, alpha: float = 1.0, fraction: float = 0.1) -> torch.Tensor:
    """Indices (sorted) of the channels that survive one trimming round of a layer with APoZ ``scores``.

    >>> channels_to_keep(torch.tensor([0.1, 0.9, 0.2, 0.15]), rule="std", alpha=1.0).tolist()
    [0, 2, 3]
    """
    n = len(scores)
    if rule == "std":
        prune = scores > scores.mean() + alpha * scores.std(unbiased=False)
    elif rule == "fraction":
        k = int(fraction * n)
        prune = torch.zeros(n, dtype=torch.bool)
        prune[torch.argsort(scores, descending=True, stable=True)[:k]] = True
    else:
        raise ValueError(f"rule: unknown value {rule!r}; accepted: std, fraction")
    if prune.all():  # always keep the channel of lowest APoZ
        prune[torch.argmin(scores)] = False
    return torch.nonzero(~prune).flatten()


@register_method
class NetworkTrimming(Method):
    name = "trimming"

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        ctx.train(model, phase="train")
        example = ctx.data.val.x[:2]
        stats_split = Split(ctx.data.val.x[: params["apoz_examples"]], ctx.data.val.y[: params["apoz_examples"]])
        rounds = []
        for r in range(params["rounds"]):
            groups = {g.name: g.activation for g in channel_groups(model, example_input=example) if g.activation}
            scores = apoz(model, stats_split, groups)
            if params["layers"] == "highest":
                top = max(scores, key=lambda g: scores[g].mean().item())
                scores = {top: scores[top]}
            keep = {g: channels_to_keep(s, rule=params["rule"], alpha=params["alpha"], fraction=params["fraction"])
                    for g, s in scores.items()}
            removed = {g: len(scores[g]) - len(k) for g, k in keep.items()}
            ctx.log(f"trimming round {r + 1}: removed {sum(removed.values())} channels "
                    f"({', '.join(f'{g} -{n}' for g, n in removed.items() if n)})")
            rounds.append({"mean_apoz": {g: round(float(s.mean()), 4) for g, s in scores.items()}, "removed": removed})
            model = remove_channels(model, keep, example_input=example)
            ctx.train(model, epochs=params["retrain_epochs"], phase=f"retrain{r + 1}", lr_scale=params["lr_scale"])
        return CompressionResult(model, info={"rounds": rounds})
