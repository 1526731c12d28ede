"""l1/l2 pseudo-norm (Berthelier, Yan, Chateau, Blanc, Duffner, Garcia 2020, arXiv 2007.10022): sparse filters.

Training adds ``lambda * sum_l R_l`` to the loss, with the scale-invariant ratio::

    R_l = ||v_l||_1 / (||v_l||_2 + eps)

Reading implemented (the grouping could not be verified against the paper):
``grouping: filter`` (the default) takes ``v_l`` as the L2 norms of the output
filters of channel group ``l``, so whole filters are driven to zero;
``grouping: kernel`` takes the L2 norm of every (output, input) kernel of a
convolution (single weights of a linear layer). A group is a layer, or the
layers whose outputs a residual sum (or a depthwise conv) ties channel by
channel: filter ``j`` of such a group is the filters ``j`` of all its
producers, with one norm over all of them, regularized and removed together.
Channels that reach a GroupNorm go in whole GroupNorm groups: a "filter" is
then the block of filters of one GroupNorm group (``granularity``).
After training the filters whose norm is below ``threshold`` times the group's
largest filter norm are removed physically (:mod:`autoslim.surgery`), once; an
optional short fine-tune (``finetune_epochs``, at a tenth of the learning
rate) follows. Every group whose channels do not reach the network output is
regularized and pruned, whatever dim its channels lie on (``layers: conv``
leaves groups with a linear producer alone), but for groups with a
spectral-normed producer (zeroing a filter there changes sigma and so the
other filters); a model with none, or whose channels the surgery cannot
remove, is refused before training (:meth:`L1L2.check`). The study's
``pruning:`` rules apply (:mod:`autoslim.selection`): ignored layers' groups are
neither regularized nor pruned, and with ``round_to`` a group keeps the largest
of its small filters that rounding its width up to the multiple needs. Given a
size target (:attr:`autoslim.methods.TrialContext.target`, parameters or FLOPs) the
filters go in order of their norm over their group's largest, over all groups,
down to the target (:mod:`autoslim.selection`), instead of by ``threshold``; a
target that is a cap (a warm-start trial under a budget) keeps ``threshold`` and
removes in that order only what the threshold leaves above it.

A removed filter does not output zero: behind it a BatchNorm (or the filter's
bias), an activation, another BatchNorm, pooling... still output a constant.
The small filters are zeroed (under ``weight_norm`` its ``g``), the model is
run on validation images and each consumer's *input* is read
(:func:`autoslim.surgery.constant_inputs`): where a removed channel is one
constant there, that constant is folded into the consumer's bias; a filter
whose channel is not constant at some consumer (it is multiplied by an
input-dependent gate, say) is kept. Folding is exact where the consumer is a
linear layer or an unpadded conv. A zero-padded conv sees the constant only
inside the image (its border windows partly read padding), so no bias
reproduces it: under the threshold rule a small filter whose constant is not 0
there is kept too (``info["kept_padded"]``, counted in the trial's log line);
where the activation and BatchNorm leave it at 0 (a zero filter whose BN shift
is 0 before a ReLU, say) it is removed. The removal is thus exact:
``info["output_change"]`` holds the relative change of the network's outputs
on validation images caused by zeroing the small filters (``zeroing``) and by
their removal (``removal``, 0 up to rounding), and the trial prints it. Under a
size target those kept filters could leave the network above it (LeNet-5's and
ResNet's convolutions are zero-padded): there the knob ``border`` (``auto``, by
default, :func:`autoslim.methods.base.border_rule`) removes them and folds their
constant all the same (``info["folded_border"]``; exact inside the image, not in
the border windows): ``removal`` then measures what that changed, and the
fine-tune follows. ``border: exact`` keeps them under a target too, ``fold``
folds them under the threshold rule as well.

>>> w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # 3 filters of a linear layer
>>> round(pseudo_norm(w).item(), 4)  # v = (5, 0, 5): 10 / sqrt(50)
1.4142
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from autoslim.config import PruningConfig
from autoslim.errors import UsageError
from autoslim.methods.base import (CHANGE_IMAGES, CompressionResult, Method, TrialContext, border_rule, outputs,
                                   register_method, relative_change)
from autoslim.selection import (Selection, SizeTarget, capped, prunable, refuse_if_all_ignored, select,
                                select_to, target_info, target_line)
from autoslim.surgery import (ChannelGroup, channel_groups, check_removal, constant_inputs, copy_model,
                              remove_channels, scale_output_channels, scales_exactly)
from autoslim.train import Callback

EPS = 1e-8
FINETUNE_LR_SCALE = 0.1

Weights = torch.Tensor | Sequence[torch.Tensor]


def _weights(weight: Weights) -> list[torch.Tensor]:
    return [weight] if isinstance(weight, torch.Tensor) else list(weight)


def filter_norms(weight: Weights, *, granularity: int = 1) -> torch.Tensor:
    """The L2 norm of every output filter (row) of a conv or linear ``weight``; of a group's producers' weights
    (a sequence), one norm per channel over all of them; with ``granularity`` g, one norm per block of g
    consecutive filters.

    >>> filter_norms(torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 0.0]]), granularity=2).tolist()
    [5.0, 1.0]
    """
    rows = torch.cat([w.flatten(1) for w in _weights(weight)], dim=1)
    return rows.reshape(rows.shape[0] // granularity, -1).norm(dim=1)


def pseudo_norm(weight: Weights, *, grouping: str = "filter", eps: float = EPS, granularity: int = 1) -> torch.Tensor:
    """``||v||_1 / (||v||_2 + eps)`` of the per-filter (per-block of ``granularity`` filters, or per-kernel) L2
    norms ``v`` of ``weight`` (one tensor, or the weights of a group's producers)."""
    if grouping == "filter":
        v = filter_norms(weight, granularity=granularity)
    elif grouping == "kernel":
        v = torch.cat([w.reshape(w.shape[0], w.shape[1], -1).norm(dim=2).flatten() for w in _weights(weight)])
    else:
        raise ValueError(f"grouping: unknown value {grouping!r}; accepted: filter, kernel")
    return v.sum() / (v.norm() + eps)


class L1L2Penalty(Callback):
    """Adds ``strength * sum(pseudo_norm(...))`` over ``layers`` to every training step's loss; an item of
    ``layers`` is a layer or the producers of one channel group (a list), regularized jointly, in blocks of
    ``granularity[i]`` filters (default 1)."""

    def __init__(self, layers: Iterable[nn.Module | Sequence[nn.Module]], *, strength: float,
                 grouping: str = "filter", granularity: Sequence[int] = ()) -> None:
        self.layers = [[item] if isinstance(item, nn.Module) else list(item) for item in layers]
        self.granularity = list(granularity) or [1] * len(self.layers)
        self.strength, self.grouping = strength, grouping

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.strength * sum(pseudo_norm([m.weight for m in group], grouping=self.grouping, granularity=g)
                                   for group, g in zip(self.layers, self.granularity))


def prunable_groups(model: nn.Module, *, example_input: torch.Tensor, layers: str = "all") -> list[ChannelGroup]:
    """The channel groups this method regularizes and prunes: every removable group (residual streams
    included) whose producers' filters can be zeroed in their parameters (not under spectral_norm), or with
    ``layers: conv`` those of them without a Linear producer."""
    if layers not in ("all", "conv"):
        raise ValueError(f"layers: unknown value {layers!r}; accepted: all, conv")
    modules = dict(model.named_modules())
    return [g for g in channel_groups(model, example_input=example_input)
            if all(scales_exactly(modules[p]) for p in g.producers)
            and (layers == "all" or not any(isinstance(modules[p], nn.Linear) for p in g.producers))]


def producer_weights(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    return [modules[p].weight for p in group.producers]


def small_filters(weight: Weights, *, threshold: float, granularity: int = 1) -> torch.Tensor:
    """Mask of the filters of ``weight`` whose norm (that of their block of ``granularity``) is below
    ``threshold`` x the largest.

    >>> small_filters(torch.tensor([[1.0, 0.0], [0.0, 1e-4], [0.0, 0.1]]), threshold=1e-2).tolist()
    [False, True, False]
    """
    norms = filter_norms([w.detach() for w in _weights(weight)], granularity=granularity)
    return (norms < threshold * norms.max()).repeat_interleave(granularity)


@torch.no_grad()
def zero_filters(model: nn.Module, groups: Iterable[ChannelGroup], channels: Mapping[str, Sequence[int]]) -> None:
    """Zero, in place, filters ``channels[group]`` of every producer of each group (biases are kept)."""
    modules = dict(model.named_modules())
    for g in groups:
        factor = torch.ones(g.size)
        factor[list(channels.get(g.name, []))] = 0
        for p in g.producers:
            scale_output_channels(modules[p], factor, bias=False)


@dataclass
class FilterRemoval:
    """What :func:`remove_small_filters` did: ``removed`` and ``kept`` ({group: channels}) are the small filters
    removed and those kept because their channel is not one constant at some consumer; ``padded`` those kept
    because a zero-padded convolution reads a non-zero constant from them (no bias reproduces its border);
    ``folded_border`` those removed all the same, with ``border="fold"`` (their constant folded, inexact in the
    border windows); ``constants`` are the values folded into each consumer
    (:func:`autoslim.surgery.constant_inputs`). A GroupNorm block with one kept channel is kept whole."""

    removed: dict[str, list[int]]
    kept: dict[str, list[int]]
    constants: dict[str, torch.Tensor]
    padded: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    target: Selection | None = None
    folded_border: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def filter_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Each filter's norm over the group's largest (per GroupNorm block, repeated for its channels): l1/l2's
    importance, comparable across groups, what :func:`small_filters` compares with its threshold."""
    norms = filter_norms([w.detach() for w in producer_weights(model, group)], granularity=group.granularity)
    return (norms / norms.max().clamp_min(torch.finfo(norms.dtype).tiny)).repeat_interleave(group.granularity)


def _selected(model: nn.Module, groups: Sequence[ChannelGroup], removing: Mapping[str, Sequence[int]],
              pruning: PruningConfig) -> dict[str, list[int]]:
    """Of the filters ``removing``, those that go once the study's rules are applied (:mod:`autoslim.selection`)."""
    masks = {g.name: torch.isin(torch.arange(g.size), torch.tensor(removing[g.name], dtype=torch.long))
             for g in groups}
    keep = select(groups, {g.name: filter_importance(model, g) for g in groups}, pruning, remove=masks).keep
    return {g.name: [j for j in removing[g.name] if j not in set(keep[g.name])] for g in groups}


def remove_small_filters(model: nn.Module, groups: Iterable[ChannelGroup], *, threshold: float,
                         example_input: torch.Tensor, pruning: PruningConfig | None = None,
                         target: SizeTarget | None = None, border: str = "exact") -> tuple[nn.Module, FilterRemoval]:
    """Remove the small filters (:func:`small_filters`) of ``groups``, folding what each consumer then reads from
    them into its bias. ``model`` keeps its shapes but its removed filters are zeroed (the masked model).
    ``pruning``'s ``round_to`` keeps the largest of the small filters that its rounding keeps (once before the
    constants are read, once after, as a filter not constant at a consumer stays); ignored groups are left out of
    ``groups`` by the caller. With a ``target`` the filters go in order of :func:`filter_importance`, over all
    groups, down to that size, instead of by ``threshold`` (:attr:`FilterRemoval.target` holds the selection); with
    a cap (:attr:`~autoslim.selection.SizeTarget.cap`) by ``threshold``, and by that order where more must go.
    ``border="fold"`` removes the filters whose non-zero constant a zero-padded conv reads too (folding it,
    inexact in the border windows: :func:`autoslim.surgery.constant_inputs`); ``"exact"`` keeps them."""
    groups = list(groups)
    pruning = pruning or PruningConfig()
    chosen = None
    scores = {g.name: filter_importance(model, g) for g in groups}
    # To a size target, a selected filter found unfoldable (not constant at a consumer, or read by a zero-padded
    # conv) stays: the selection is made again with it kept first, until every selected filter can go, or until a
    # selection finds no unfoldable filter it did not know (the next one would be the same: the target needs them).
    kept_first: set[tuple[str, int]] = set()
    for _ in range(1 + (sum(g.size for g in groups) if target is not None else 0)):
        small = chosen = None
        if target is None or target.cap:
            small = {g.name: torch.nonzero(small_filters(producer_weights(model, g), threshold=threshold,
                                                         granularity=g.granularity)).flatten().tolist()
                     for g in groups}
        if target is not None and small is None:
            chosen = select_to(target, groups, scores, pruning, model=model, example_input=example_input)
        elif target is not None:  # a cap: the rule's filters, and more if the rule leaves a network above it
            by_rule = {g.name: sorted(set(range(g.size)) - set(small[g.name])) for g in groups}
            chosen = capped(target, by_rule, groups, scores, pruning, model=model, example_input=example_input)
        if chosen is not None:
            small = {g.name: [j for j in range(g.size) if j not in set(chosen.keep[g.name])] for g in groups}
        small = _selected(model, groups, small, pruning)
        masked = copy_model(model)
        zero_filters(masked, groups, small)
        found = constant_inputs(masked, small, example_input=example_input, border=border)
        unfoldable = found.unfoldable()
        new = {(g.name, j) for g in groups for j in unfoldable.get(g.name, ())} - kept_first
        if chosen is None or not new:
            break
        kept_first |= new
        for name, j in new:  # a filter (its GroupNorm block) that must stay is kept first: the next selection
            g = next(g for g in groups if g.name == name)  # reaches the target without it
            start = j // g.granularity * g.granularity
            scores[name][start:start + g.granularity] = float("inf")
    if chosen is not None and any(unfoldable.get(g.name) for g in groups):
        chosen = dataclasses.replace(chosen, reached=False)  # the target needs a filter that has to stay
    removed, kept, padded, folded = {}, {}, {}, {}
    for g in groups:
        blocks = {j // g.granularity for j in unfoldable.get(g.name, ())}
        removed[g.name] = [j for j in small[g.name] if j // g.granularity not in blocks]
        for out, reason in ((kept, found.varying), (folded if found.padded_folded else padded, found.padded)):
            if reason.get(g.name):
                out[g.name] = [j for j in small[g.name] if j in reason[g.name]]
    removed = _selected(model, groups, removed, pruning)
    folded = {name: gone for name, c in folded.items() if (gone := sorted(set(c) & set(removed[name])))}
    zero_filters(model, groups, removed)
    keep = {g.name: sorted(set(range(g.size)) - set(removed[g.name])) for g in groups}
    new = remove_channels(model, keep, example_input=example_input, consumer_constants=found.constants)
    return new, FilterRemoval(removed, kept, found.constants, padded, chosen, folded)


def prune_small_filters(model: nn.Module, groups: Iterable[ChannelGroup], *, threshold: float,
                        example_input: torch.Tensor) -> tuple[nn.Module, dict[str, int]]:
    """:func:`remove_small_filters`, returning the new model and the count removed per group."""
    new, removal = remove_small_filters(model, groups, threshold=threshold, example_input=example_input)
    return new, {g: len(c) for g, c in removal.removed.items()}


@register_method
class L1L2(Method):
    name = "l1l2"
    check_params = ("layers",)
    structured = True
    size_knobs = ("threshold", "layers")
    target_measures = ("params", "flops")
    trains_before_removal = True

    def groups(self, model: nn.Module, *, example_input: torch.Tensor, layers: str,
               pruning: PruningConfig | None = None) -> list[ChannelGroup]:
        """:func:`prunable_groups` that ``pruning.ignore`` leaves, refusing a model with none."""
        pruning = pruning or PruningConfig()
        found = prunable_groups(model, example_input=example_input, layers=layers)
        groups = prunable(found, pruning)
        refuse_if_all_ignored("l1l2", model, found, groups, pruning)
        if not groups:
            raise UsageError(f"l1l2: {type(model).__name__} has no removable channel group"
                             f"{' without a Linear producer (layers: conv)' if layers == 'conv' else ''}: "
                             "every convolution/Linear output reaches the network output or a channel it cannot "
                             "resize")
        return groups

    def check(self, model: nn.Module, *, example_input: torch.Tensor, params: Mapping[str, Any],
              pruning: PruningConfig | None = None) -> None:
        """Refuse a model with no prunable group (none left by ``pruning.ignore``), or whose channels cannot be
        removed."""
        groups = self.groups(model, example_input=example_input, layers=params["layers"], pruning=pruning)
        check_removal(model, example_input=example_input, groups=groups)

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        if self.starts_from_base(params):
            ctx.pretrained(model)
        example = ctx.examples(8)
        groups = self.groups(model, example_input=example, layers=params["layers"], pruning=ctx.pruning)
        modules = dict(model.named_modules())
        penalty = L1L2Penalty([[modules[p] for p in g.producers] for g in groups], strength=params["lambda"],
                              grouping=params["grouping"], granularity=[g.granularity for g in groups])
        ctx.train(model, phase="sparse", callbacks=[penalty])
        images = ctx.examples(CHANGE_IMAGES)
        trained = outputs(model, images)
        small, removal = remove_small_filters(model, groups, threshold=params["threshold"], example_input=example,
                                              pruning=ctx.pruning, target=ctx.target, border=border_rule(params, ctx))
        info = {"target": target_info(removal.target, ctx.target)} if removal.target else {}
        if info:
            ctx.log(target_line("l1l2", info["target"]))
        masked = outputs(model, images)  # ``model`` now has its removed filters zeroed
        change = {"zeroing": relative_change(masked, trained),
                  "removal": relative_change(outputs(small, images), masked)}
        model = small
        removed = {g: len(c) for g, c in removal.removed.items()}
        kept = sum(len(c) for c in removal.kept.values())
        padded = sum(len(c) for c in removal.padded.values())
        folded = sum(len(c) for c in removal.folded_border.values())
        ctx.log(f"l1l2: removed {sum(removed.values())} filters "
                f"({', '.join(f'{g} -{n}' for g, n in removed.items() if n)})"
                + (f", kept {kept} small ones not constant at a consumer" if kept else "")
                + (f", kept {padded} small ones whose non-zero constant a zero-padded conv reads" if padded else "")
                + (f" ({folded} removed although a zero-padded conv reads their non-zero constant: folded, "
                   "inexact in its border windows)" if folded else "")
                + f"; output change on {len(images)} val images: zeroing {change['zeroing']:.3g}, "
                f"removal {change['removal']:.3g}")
        ctx.train(model, epochs=params["finetune_epochs"], phase="finetune", lr_scale=FINETUNE_LR_SCALE)
        return CompressionResult(model, info={"removed": removed, "kept_not_constant": removal.kept,
                                              "kept_padded": removal.padded, "folded_border": removal.folded_border,
                                              "output_change": change, **info})
