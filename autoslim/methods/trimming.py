"""Network Trimming (Hu, Peng, Tai, Tang 2016, arXiv 1607.03250): remove channels of high APoZ.

APoZ (average percentage of zeros) of output channel c, measured after its
activation, in eval mode, over N held-out examples and M spatial positions::

    APoZ_c = #{exact zeros in channel c} / (N * M)

"After its activation" is every activation call the channel's values pass
through (:attr:`autoslim.surgery.ChannelGroup.sites`): an activation module
called once or several times (torchvision's ResNet blocks reuse one ReLU), a
function (``F.relu``, ``x.relu()``), on whatever dim the channels lie (the
hidden width of a channel-last MLP too); the values are read on the traced
model (:func:`autoslim.surgery.probe`). A channel tied across a residual
stream passes one activation per block: its zeros and positions are pooled
over all of them. Only channel groups that pass an activation are trimmed; a
model with none is refused before training (:meth:`NetworkTrimming.check`),
as is one whose channels the surgery cannot remove.

Each round removes, in every target group, the channels whose APoZ exceeds
``mean + alpha * std`` of the group (rule ``std``, our reading of the paper's
"one standard deviation above the mean"; unverified, hence ``alpha`` is a
knob) or the floor of ``fraction`` x channels with the highest APoZ (rule
``fraction``), physically (:mod:`autoslim.surgery`), then retrains from the
surviving weights. ``layers: highest`` trims only the channel group (a layer,
or the layers a residual stream ties) of highest mean APoZ per round, the
paper's order; ``all`` trims every group. A group always keeps at least one
channel. Channels that reach a GroupNorm go in whole GroupNorm groups
(``granularity``): the rule then reads the mean APoZ of each block. The
study's ``pruning:`` rules apply (:mod:`autoslim.selection`): ignored layers'
groups are neither measured nor trimmed, and with ``round_to`` a group keeps
the count the rule leaves rounded up to the multiple, the extra channels
those of lowest APoZ among the ones the rule removes. Given a parameter
target (:attr:`autoslim.methods.TrialContext.target`, parameters or FLOPs) each round
instead removes channels of every measurable group (whatever ``layers``
says) in APoZ order, highest first, down to the same ratio per round, the
last round down to the target (within one channel, or one unit of
``round_to``, of it). A target that is a cap (:attr:`autoslim.selection.SizeTarget.cap`, a warm-start
trial under a budget) leaves the rounds to the rule and, where the last one leaves more, removes in
APoZ order down to it. Statistics
are collected on the validation images (labels are not used), never on a
single batch.

A removed channel that is one constant where a consumer reads it (0 after its
ReLU, or ``relu(BN_k(0))`` for a dead DenseNet channel at each later layer's
own BatchNorm) has that constant folded into the consumer's bias
(:func:`remove_trimmed`); a channel that still varies is simply dropped, so
each round measures and logs the relative change of the outputs on validation
images (``info["rounds"][i]["output_change"]``) before retraining.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from autoslim.config import PruningConfig
from autoslim.data import Split, batches
from autoslim.errors import UsageError
from autoslim.methods.base import (CHANGE_IMAGES, CompressionResult, Method, TrialContext, outputs,
                                   register_method, relative_change)
from autoslim.selection import (capped, prunable, refuse_if_all_ignored, select, select_to, target_info,
                                target_line)
from autoslim.surgery import ChannelGroup, channel_groups, check_removal, constant_inputs, probe, remove_channels

CONSTANT_IMAGES = 8  # validation images on which a removed channel's constant at each consumer is read


@torch.no_grad()
def apoz(model: nn.Module, split: Split, groups: Sequence[ChannelGroup], *,
         batch_size: int = 500) -> dict[str, torch.Tensor]:
    """APoZ of every channel of each of ``groups`` over ``split``, pooled over the group's activation sites.

    Every group must have at least one site (:func:`measurable_groups`).
    """
    at: dict[str, list[tuple[str, torch.Tensor, int]]] = {}  # site node -> (group, channel of each entry, dim)
    for g in groups:
        if not g.sites:
            raise ValueError(f"apoz: group {g.name!r} passes no activation")
        for site in g.sites:
            at.setdefault(site.node, []).append((g.name, torch.tensor(site.channels), site.dim))
    zeros = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    counts = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}

    def count(node: str, out: torch.Tensor) -> None:
        for group, channels, dim in at[node]:
            flat = out.detach().movedim(dim, 0).reshape(out.shape[dim], -1)  # entries x (N * positions)
            z = (flat == 0).sum(1).double().cpu()
            mine = channels >= 0
            zeros[group].index_add_(0, channels[mine], z[mine])
            counts[group].index_add_(0, channels[mine], torch.full((int(mine.sum()),), float(flat.shape[1]),
                                                                   dtype=torch.float64))

    probe(model, (x for x, _ in batches(split, batch_size=batch_size)), nodes=at, on_output=count)
    return {g: (zeros[g] / counts[g].clamp_min(1)).float() for g in zeros}


def measurable_groups(model: nn.Module, *, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The removable channel groups that pass an activation (where APoZ is measured); a UsageError if none."""
    groups = [g for g in channel_groups(model, example_input=example_input) if g.sites]
    if not groups:
        raise UsageError(f"trimming: {type(model).__name__} has no removable channel group that passes an "
                         "activation (APoZ is measured there): no ReLU-like activation follows a convolution/Linear "
                         "layer whose channels do not reach the output")
    return groups


def channels_to_keep(scores: torch.Tensor, *, rule: str, alpha: float = 1.0, fraction: float = 0.1,
                     granularity: int = 1) -> torch.Tensor:
    """Indices (sorted) of the channels that survive one trimming round of a group with APoZ ``scores``.

    With ``granularity`` > 1 the channels go in blocks of that many (a GroupNorm's groups): the rule reads
    each block's mean APoZ and keeps or removes whole blocks.

    >>> channels_to_keep(torch.tensor([0.1, 0.9, 0.2, 0.15]), rule="std", alpha=1.0).tolist()
    [0, 2, 3]
    >>> channels_to_keep(torch.tensor([0.1, 0.9, 0.8, 0.7]), rule="fraction", fraction=0.5, granularity=2).tolist()
    [0, 1]
    """
    if granularity > 1:
        blocks = channels_to_keep(scores.view(-1, granularity).mean(1), rule=rule, alpha=alpha, fraction=fraction)
        return (blocks[:, None] * granularity + torch.arange(granularity)).flatten()
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


def trimmed_groups(model: nn.Module, *, example_input: torch.Tensor, pruning: PruningConfig) -> list[ChannelGroup]:
    """The measurable groups that ``pruning.ignore`` leaves to trim (a UsageError if it leaves none)."""
    found = measurable_groups(model, example_input=example_input)
    groups = prunable(found, pruning)
    refuse_if_all_ignored("trimming", model, found, groups, pruning)
    return groups


def keep_by_rule(groups: Mapping[str, ChannelGroup], scores: dict[str, torch.Tensor], params: Mapping[str, Any],
                 pruning: PruningConfig) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """One round of the method's own rule (``layers``, ``rule``, ``alpha``, ``fraction``) under ``pruning``:
    the APoZ of the groups it trims and the channels they keep."""
    if params["layers"] == "highest":
        top = max(scores, key=lambda g: scores[g].mean().item())
        scores = {top: scores[top]}
    by_rule = {g: channels_to_keep(s, rule=params["rule"], alpha=params["alpha"], fraction=params["fraction"],
                                   granularity=groups[g].granularity) for g, s in scores.items()}
    return scores, select(groups.values(), {g: -s for g, s in scores.items()}, pruning,
                          remove={g: _mask_out(k, len(scores[g])) for g, k in by_rule.items()}).keep


def _mask_out(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The mask of the channels of ``size`` not in ``kept``."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return mask


def remove_trimmed(model: nn.Module, keep: Mapping[str, torch.Tensor], *, sizes: Mapping[str, int],
                   example_input: torch.Tensor, sample: torch.Tensor) -> nn.Module:
    """Remove all channels but ``keep`` ({group: indices}) of ``model``, folding into each consumer's bias the
    constant it reads from a removed channel (:func:`autoslim.surgery.constant_inputs` on ``sample``): a
    channel that is 0 where APoZ is measured may still be a non-zero constant at a consumer (DenseNet's
    concatenated channels pass each later layer's own BatchNorm and ReLU), and a dead filter's bias survives
    its activation. Channels that vary, or whose constant a zero-padded conv reads, are removed unfolded.
    ``sizes``: the channel count of each group of ``keep``."""
    gone = {g: sorted(set(range(sizes[g])) - set(torch.as_tensor(k).tolist())) for g, k in keep.items()}
    found = constant_inputs(model, {g: c for g, c in gone.items() if c}, example_input=sample)
    return remove_channels(model, keep, example_input=example_input, consumer_constants=found.constants)


@register_method
class NetworkTrimming(Method):
    name = "trimming"
    structured = True
    size_knobs = ("rule", "alpha", "fraction", "layers")
    target_measures = ("params", "flops")

    def starts_from_base(self, params: Mapping[str, Any]) -> bool:
        return True

    def check(self, model: nn.Module, *, example_input: torch.Tensor, params: Mapping[str, Any],
              pruning: PruningConfig | None = None) -> None:
        """Refuse a model with no measurable group (none left by ``pruning.ignore``), or whose channels cannot be
        removed."""
        pruning = pruning or PruningConfig()
        check_removal(model, example_input=example_input,
                      groups=trimmed_groups(model, example_input=example_input, pruning=pruning))

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        ctx.pretrained(model)
        example, images = ctx.examples(2), ctx.examples(CHANGE_IMAGES)
        stats_split = ctx.data.val.head(params["apoz_examples"])
        rounds, info = [], {}
        for r in range(params["rounds"]):
            groups = {g.name: g for g in trimmed_groups(model, example_input=example, pruning=ctx.pruning)}
            scores = apoz(model, stats_split, list(groups.values()))
            importance = {g: -s for g, s in scores.items()}
            chosen = None
            if ctx.target is None or ctx.target.cap:
                scores_by_rule, keep = keep_by_rule(groups, scores, params, ctx.pruning)
                if ctx.target is not None and r == params["rounds"] - 1:  # the rule's network, capped
                    chosen = capped(ctx.target, keep, groups.values(), importance, ctx.pruning, model=model,
                                    example_input=example)
                scores, keep = (scores_by_rule, keep) if chosen is None else (scores, chosen.keep)
            else:
                chosen = select_to(ctx.target, groups.values(), importance, ctx.pruning,
                                   model=model, example_input=example, rounds_left=params["rounds"] - r)
                keep = chosen.keep
            if chosen is not None and (chosen.last is not None or not info):  # the last round that removed some
                info["target"] = target_info(chosen, ctx.target)
            removed = {g: len(scores[g]) - len(k) for g, k in keep.items()}
            before = outputs(model, images)
            model = remove_trimmed(model, keep, sizes={g: groups[g].size for g in keep}, example_input=example,
                                   sample=ctx.examples(CONSTANT_IMAGES))
            change = relative_change(outputs(model, images), before)
            ctx.log(f"trimming round {r + 1}: removed {sum(removed.values())} channels "
                    f"({', '.join(f'{g} -{n}' for g, n in removed.items() if n)}); output change on "
                    f"{len(images)} val images: {change:.3g}")
            rounds.append({"mean_apoz": {g: round(float(s.mean()), 4) for g, s in scores.items()}, "removed": removed,
                           "output_change": change})
            ctx.train(model, epochs=params["retrain_epochs"], phase=f"retrain{r + 1}", lr_scale=params["lr_scale"])
        if info:
            ctx.log(target_line("trimming", info["target"]))
        return CompressionResult(model, info={"rounds": rounds, **info})
