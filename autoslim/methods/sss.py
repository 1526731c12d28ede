"""Sparse Structure Selection (Huang and Wang 2018, arXiv 1707.01213): scaling factors, APG, adaptive width and depth.

A learnable factor (initialised to 1) multiplies the output of every structure:

- ``channel``: each channel before its activation, i.e. after its BatchNorm
  or GroupNorm (VGG, and the internal channels of every ResNet block), or
  after the conv/linear layer itself where no norm follows (LeNets, the hidden
  width of a ConvNeXt/ViT/Swin MLP, whose channels lie on the last dim).
  Channels tied across a residual stream get no factor; channels that reach a
  GroupNorm get one factor per GroupNorm group (they go in whole blocks).
- ``block``: every residual branch, ``r_{i+1} = act(shortcut(r_i) + lambda_i * F(r_i))``:
  the branches of autoslim's and torchvision's BasicBlock/Bottleneck (the
  factor sits after ``bn2``/``bn3``) and of any block whose forward computes
  ``x + f(x)`` (:func:`autoslim.surgery.residual_branches`: MobileNet,
  EfficientNet, MNASNet, RegNet, ConvNeXt...), the factor after the last
  conv, linear or normalisation layer of ``f``.

``level: both`` scales channels and branches; a model without one of them is
refused (as is ``block`` on a model without residual branches), before any
training (:meth:`SparseStructureSelection.check`), never silently narrowed.
The study's ``pruning:`` rules apply (:mod:`autoslim.selection`): the groups of
ignored layers, and the residual branches that are or hold one, get no factor;
with ``round_to`` a group keeps the channels of largest factor that rounding
its width up to the multiple needs (those of factor 0 then stay as channels
that output a constant). Given a size target
(:attr:`autoslim.methods.TrialContext.target`) the channels go in
order of |factor|, over all groups, down to the target, instead of by
``threshold`` (a target that is a cap, a warm-start trial under a budget:
by ``threshold``, then in that order only what it leaves above the cap).

The weights train with SGD + Nesterov momentum and weight decay; the factors
train with :class:`APG` only (no weight decay), which applies the penalty
``gamma * ||lambda||_1`` by soft thresholding; its ``eta_t`` is the weights' lr
under the same schedule, so sparsification fades as the lr decays. After training the factors are
folded into the layer they scale (the norm's weight and bias, or the
conv/linear weight and bias; under ``weight_norm`` its ``g``; a layer under
``spectral_norm`` gets no factor, its sigma would follow the scale), so the
model is made of standard layers again, then every
channel whose factor is ``<= threshold`` (exact zeros at ``threshold: 0``) is
removed (:func:`autoslim.surgery.remove_channels`; a group keeps its largest
channel) and every branch whose factor is ``<= threshold`` is removed
(:func:`autoslim.surgery.remove_blocks`): the network gets shallower.
A zero channel still holds ``act(0)`` after its activation (0 for ReLU,
0.5 for a sigmoid): what each consumer reads from it is folded into the
consumer's bias (:func:`autoslim.surgery.constant_inputs`), so removing a
zero structure keeps the network's function exactly; a zero channel whose
constant is not 0 at a zero-padded conv (whose border windows read padding)
is kept (``info["kept_padded"]``), unless the knob ``border`` says to fold it
all the same (``auto``, the default, does so under a size target, which such
kept channels could put out of reach: :func:`autoslim.methods.base.border_rule`;
``info["folded_border"]``); ``info["removal_change"]``
is the measured relative output change on validation images. One training
pass, then an optional fine-tune (``finetune_epochs`` at a tenth of the
learning rate; not in the paper).

>>> p = nn.Parameter(torch.tensor([1.0, 0.004]))
>>> p.grad = torch.tensor([0.0, 0.0])
>>> APG([p], lr=0.1, gamma=0.05).step()  # soft threshold 0.1 * 0.05 = 0.005
>>> [round(v, 6) for v in p.tolist()]  # 1 - 0.005 - 0.9 * 0.005, and 0.004 -> exactly 0
[0.9905, 0.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from autoslim.config import PruningConfig
from autoslim.errors import UsageError
from autoslim.methods.base import (CHANGE_IMAGES, CompressionResult, Method, TrialContext, border_rule, outputs,
                                   register_method, relative_change)
from autoslim.measure import count_flops, count_params
from autoslim.selection import (Selection, SizeTarget, capped, prunable, prunable_block, refuse_if_all_ignored,
                                select, select_to, target_info, target_line)
from autoslim.surgery import (channel_groups, check_removal, constant_inputs, remove_blocks,
                              remove_channels, residual_branches, scale_output_channels, scales_exactly)

FINETUNE_LR_SCALE = 0.1
LEVELS = ("channel", "block", "both")


class APG(torch.optim.Optimizer):
    """The modified stochastic Accelerated Proximal Gradient of SSS, for the scaling factors.

    The parameter holds the look-ahead point ``lambda'`` (where the gradient is
    taken); the state holds ``v``. With ``eta_t`` the group's (scheduled) lr::

        z_t       = lambda'_{t-1} - eta_t * grad(lambda'_{t-1})
        v_t       = S_{eta_t*gamma}(z_t) - lambda'_{t-1} + mu * v_{t-1}
        lambda'_t = max(S_{eta_t*gamma}(z_t) + mu * v_t, 0)

    ``S_a(z) = sign(z) * max(|z| - a, 0)``; ``v_0 = 0`` and the first step is a
    full step. The clamp at 0 follows the official code; there is no weight decay.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, gamma: float, momentum: float = 0.9) -> None:
        if lr < 0 or gamma < 0 or not 0 <= momentum < 1:
            raise ValueError(f"APG: expected lr >= 0, gamma >= 0, 0 <= momentum < 1; got {lr}, {gamma}, {momentum}")
        super().__init__(params, {"lr": lr, "gamma": gamma, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta, gamma, mu = group["lr"], group["gamma"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("v", torch.zeros_like(p))
                z = p - eta * p.grad
                s = z.sign() * (z.abs() - eta * gamma).clamp_min(0)
                v.mul_(mu).add_(s - p)
                p.copy_(s + mu * v).clamp_(min=0)
        return loss


class Structure(NamedTuple):
    """A structure SSS scales: a channel group or a residual branch (``name``), the module whose output the
    factor multiplies (``site``), the number of factors (``size``: one per channel or per GroupNorm block of
    ``granularity`` channels, one for a branch) and the dim of the site's output they lie along."""

    kind: str
    name: str
    site: str
    size: int
    dim: int = 1
    granularity: int = 1


def structures(model: nn.Module, *, level: str, example_input: torch.Tensor,
               pruning: PruningConfig | None = None) -> list[Structure]:
    """Every structure SSS scales at ``level`` but those ``pruning.ignore`` leaves whole; a UsageError if ``level``
    finds nothing to scale in ``model`` (``both`` needs channels and residual branches), or the ignore leaves
    nothing."""
    pruning = pruning or PruningConfig()
    if level not in LEVELS:
        raise ValueError(f"level: unknown value {level!r}; accepted: {', '.join(LEVELS)}")
    modules = dict(model.named_modules())
    found: dict[str, list[Structure]] = {"channel": [], "block": []}
    left: set[str] = set()  # the channel structures pruning.ignore leaves
    if level in ("channel", "both"):
        for g in channel_groups(model, example_input=example_input):
            norms = g.batchnorms + g.groupnorms
            site = (norms or g.producers)[0]
            if len(g.producers) == 1 and len(norms) <= 1 and scales_exactly(modules[site]):
                found["channel"].append(Structure("channel", g.name, site, g.size // g.granularity,
                                                  1 if norms else g.channel_dim, g.granularity))
                left.update(p.name for p in prunable([g], pruning))
    if level in ("block", "both"):
        found["block"] = [Structure("block", b.name, b.scale_site, 1) for b in residual_branches(model)
                          if b.scale_site]
    missing = [k for k in ("channel", "block") if level in (k, "both") and not found[k]]
    if missing:
        what = {"channel": "channel group with a single producer (a layer whose channels are not tied to others "
                           "and do not reach the output)",
                "block": "residual branch x + f(x) (in a submodule, f ending in a conv, linear or norm layer)"}
        hint = f"; use level: {'block' if missing == ['channel'] else 'channel'}" if level == "both" else ""
        raise UsageError(f"sss: no structure to scale at level {level!r}: {type(model).__name__} has no "
                         f"{what[missing[0]]}{hint}")
    everything = found["channel"] + found["block"]
    kept = [st for st in everything if st.name in left or (st.kind == "block"
                                                           and prunable_block(st.name, modules, pruning))]
    refuse_if_all_ignored("sss", model, everything, kept, pruning)
    return kept


@dataclasses.dataclass
class Scale:
    """One structure's factor: ``structure`` is a channel-group name or a branch name; ``site`` the scaled
    module, whose output ``factor`` multiplies along ``dim`` (each entry repeated ``granularity`` times)."""

    kind: str
    structure: str
    site: str
    factor: nn.Parameter
    dim: int = 1
    granularity: int = 1

    def per_channel(self) -> torch.Tensor:
        return self.factor.repeat_interleave(self.granularity) if self.granularity > 1 else self.factor


class Scales:
    """Scaling factors attached to ``model`` by forward hooks (they are not parameters of the model).

    >>> from autoslim.models import create_model
    >>> model = create_model("resnet20", in_shape=(1, 8, 8), num_classes=3)
    >>> scales = Scales(model, level="both", example_input=torch.zeros(2, 1, 8, 8))
    >>> sum(s.kind == "block" for s in scales), sum(s.kind == "channel" for s in scales)
    (9, 9)
    """

    def __init__(self, model: nn.Module, *, level: str, example_input: torch.Tensor,
                 pruning: PruningConfig | None = None) -> None:
        self.model = model
        device = example_input.device
        found = structures(model, level=level, example_input=example_input, pruning=pruning)
        self.scales = [Scale(st.kind, st.name, st.site, nn.Parameter(torch.ones(st.size, device=device)), st.dim,
                             st.granularity) for st in found]
        modules = dict(model.named_modules())
        self._handles = [modules[s.site].register_forward_hook(_multiplier(s)) for s in self.scales]

    def __iter__(self) -> Iterator[Scale]:
        return iter(self.scales)

    def parameters(self) -> list[nn.Parameter]:
        return [s.factor for s in self.scales]

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply every factor into its site's parameters and remove the hooks: standard layers again."""
        for h in self._handles:
            h.remove()
        modules = dict(self.model.named_modules())
        for s in self.scales:
            scale_output_channels(modules[s.site], s.per_channel())


def _multiplier(scale: Scale):
    def hook(module, inputs, out):
        shape = [1] * out.dim()
        shape[scale.dim] = -1
        return out * scale.per_channel().view(shape)
    return hook


def _surviving_channels(model: nn.Module, scales: Scales, *, threshold: float, pruning: PruningConfig,
                        target: SizeTarget | None, example_input: torch.Tensor):
    """The scaled channel groups, their importance (|factor|), the channels that survive (by ``threshold`` or
    ``target``, under ``pruning``) and the target's :class:`~autoslim.selection.Selection` (or None)."""
    channel_scales = [s for s in scales if s.kind == "channel"]
    groups = [g for g in channel_groups(model, example_input=example_input)
              if g.name in {s.structure for s in channel_scales}] if channel_scales else []
    importance = {s.structure: s.per_channel().detach().abs() for s in channel_scales}
    if target is not None and not target.cap and groups:
        chosen = select_to(target, groups, importance, pruning, model=model, example_input=example_input)
        return groups, importance, chosen.keep, chosen
    small = {s.structure: s.per_channel().detach() <= threshold for s in channel_scales}
    keep = select(groups, importance, pruning, remove=small).keep
    chosen = None
    if target is not None and groups:  # a cap: the rule's channels, and more if it leaves a network above it
        chosen = capped(target, keep, groups, importance, pruning, model=model, example_input=example_input)
    return groups, importance, keep if chosen is None else chosen.keep, chosen


def _blocks_to_target(model: nn.Module, scales: Scales, target: SizeTarget, *,
                      example_input: torch.Tensor) -> Selection:
    """Zero the factors of the residual branches of smallest |factor| (those already 0 first) until removing
    them leaves ``model`` within ``target`` (of a cap: only when the zero ones leave it above); the selection
    (``keep``: empty, ``size`` the count, ``over`` with the last branch put back)."""
    size = {"params": count_params,
            "flops": lambda m: count_flops(m, in_shape=tuple(example_input.shape[1:]))}[target.measure]
    order = sorted((s for s in scales if s.kind == "block"), key=lambda s: abs(s.factor.item()))
    gone = [s.structure for s in order if s.factor.item() == 0.0]
    counts = [size(remove_blocks(model, gone) if gone else model)]
    for s in order[len(gone):]:
        if counts[-1] <= target.value:
            break
        with torch.no_grad():
            s.factor.zero_()
        gone.append(s.structure)
        counts.append(size(remove_blocks(model, gone)))
    return Selection({}, size=counts[-1], target=target.value, reached=counts[-1] <= target.value,
                     over=counts[-2] if len(counts) > 1 else None, last=("blocks", gone[-1:]) if gone else None)


def remove_zero_structures(model: nn.Module, scales: Scales, *, threshold: float,
                           example_input: torch.Tensor, pruning: PruningConfig | None = None,
                           target: SizeTarget | None = None, border: str = "exact") -> tuple[nn.Module, dict]:
    """Set every factor ``<= threshold`` to 0, fold ``scales`` into ``model``, then remove those structures.

    What a consumer reads from a removed channel (its activation of 0) is folded into the consumer; a channel
    (a GroupNorm block) that is not one constant there, or whose non-zero constant a zero-padded conv reads, is
    kept. ``pruning``'s ``round_to`` keeps the largest of the small factors that rounding a group's width up needs
    (:mod:`autoslim.selection`; a group keeps at least its largest channel). With a ``target`` the channels go in
    order of |factor|, over all groups, down to that size (``info["target"]``), instead of by ``threshold``
    (branches still go by ``threshold``; at ``level: block``, without channels to select, the branches go in
    order of |factor| down to the target, :func:`_blocks_to_target`). Returns the new model and what was removed
    (``channels``: {group: count}, ``blocks``: names, ``kept_padded``: {group: count} of zero-factor channels kept
    for a zero-padded conv; with ``border="fold"`` they are removed, their constant folded, inexact in the
    conv's border windows, and counted in ``folded_border`` instead).
    """
    pruning = pruning or PruningConfig()
    drop, removed = {}, {}
    groups, importance, survive, chosen = _surviving_channels(model, scales, threshold=threshold, pruning=pruning,
                                                              target=target, example_input=example_input)
    with torch.no_grad():
        for s in scales:  # a factor <= threshold is taken as 0: the structure is removed exactly
            kept = s.factor > threshold
            if s.kind == "channel":
                kept = torch.zeros_like(kept)
                kept[[j // s.granularity for j in survive[s.structure]]] = True
            s.factor[~kept] = 0.0
            if s.kind == "channel":
                drop[s.structure] = torch.nonzero(~kept.repeat_interleave(s.granularity)).flatten().tolist()
    if target is not None and not groups:  # branches only (level: block): they go in |factor| order
        chosen = _blocks_to_target(model, scales, target, example_input=example_input)
    scales.fold()
    found = constant_inputs(model, drop, example_input=example_input, border=border) if drop else None
    unfoldable = found.unfoldable() if found else {}
    keep = {}
    for s in scales:
        if s.kind == "channel":
            g = s.granularity
            blocks = {j // g for j in unfoldable.get(s.structure, ())}
            gone = {j for j in drop[s.structure] if j // g not in blocks}
            keep[s.structure] = [j for j in range(len(s.factor) * g) if j not in gone]
    if keep:  # a channel kept as not constant at a consumer: the widths are rounded again
        keep = select(groups, importance, pruning, remove={
            n: ~torch.isin(torch.arange(len(importance[n])), torch.tensor(k)) for n, k in keep.items()}).keep
        removed = {n: len(importance[n]) - len(k) for n, k in keep.items()}
    blocks = [s.structure for s in scales if s.kind == "block" and s.factor.item() == 0.0]
    if keep:
        model = remove_channels(model, keep, example_input=example_input, consumer_constants=found.constants)
    if blocks:
        model = remove_blocks(model, blocks)
    padded = {g: len(c) for g, c in (found.padded if found else {}).items()}
    folded = found is not None and found.padded_folded
    return model, {"channels": removed, "blocks": blocks, "kept_padded": {} if folded else padded,
                   "folded_border": padded if folded else {},
                   **({"target": target_info(chosen, target)} if chosen else {})}


@register_method
class SparseStructureSelection(Method):
    name = "sss"
    check_params = ("level",)
    structured = True
    size_knobs = ("threshold",)
    target_measures = ("params", "flops")
    trains_before_removal = True

    def check(self, model: nn.Module, *, example_input: torch.Tensor, params: Mapping[str, Any],
              pruning: PruningConfig | None = None) -> None:
        """Refuse a model without the structures of ``level`` (or none left by ``pruning.ignore``), or whose
        structures cannot be removed."""
        found = structures(model, level=params["level"], example_input=example_input, pruning=pruning)
        channels = {st.name for st in found if st.kind == "channel"}
        check_removal(model, example_input=example_input,
                      groups=[g for g in channel_groups(model, example_input=example_input) if g.name in channels],
                      blocks=[st.name for st in found if st.kind == "block"])

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        if self.starts_from_base(params):
            ctx.pretrained(model)
        example = ctx.examples(8)
        config = dataclasses.replace(ctx.train_config, nesterov=True)
        scales = Scales(model, level=params["level"], example_input=example, pruning=ctx.pruning)
        apg = APG(scales.parameters(), lr=config.lr, gamma=params["gamma"])
        ctx.train(model, phase="sparse", config=config, extra_optimizers=[apg])
        factors = {s.structure: [round(v, 4) for v in s.factor.tolist()] for s in scales}
        images = ctx.examples(CHANGE_IMAGES)
        scaled = outputs(model, images)
        model, removed = remove_zero_structures(model, scales, threshold=params["threshold"], example_input=example,
                                                pruning=ctx.pruning, target=ctx.target,
                                                border=border_rule(params, ctx))
        if "target" in removed:
            ctx.log(target_line("sss", removed["target"]))
        change = relative_change(outputs(model, images), scaled)
        ctx.log(f"sss: removed {sum(removed['channels'].values())} channels and {len(removed['blocks'])} blocks"
                + (f" ({', '.join(removed['blocks'])})" if removed["blocks"] else "")
                + (f", kept {sum(removed['kept_padded'].values())} zero channels whose non-zero constant a "
                   "zero-padded conv reads" if removed["kept_padded"] else "")
                + (f" ({sum(removed['folded_border'].values())} removed although a zero-padded conv reads their "
                   "non-zero constant: folded, inexact in its border windows)" if removed["folded_border"] else "")
                + f"; output change on {len(images)} val images: {change:.3g}")
        ctx.train(model, epochs=params["finetune_epochs"], phase="finetune", config=config,
                  lr_scale=FINETUNE_LR_SCALE)
        return CompressionResult(model, info={**removed, "factors": factors, "removal_change": change})
