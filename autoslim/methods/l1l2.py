"""l1/l2 pseudo-norm (Berthelier, Yan, Chateau, Blanc, Duffner, Garcia 2020, arXiv 2007.10022): sparse filters.

Training adds ``lambda * sum_l R_l`` to the loss, with the scale-invariant ratio::

    R_l = ||v_l||_1 / (||v_l||_2 + eps)

Reading implemented (the grouping could not be verified against the paper):
``grouping: filter`` (the default) takes ``v_l`` as the L2 norms of the layer's
output filters, so whole filters are driven to zero; ``grouping: kernel``
takes the L2 norm of every (output, input) kernel of a convolution (single
weights of a linear layer). Either way, after training the filters whose norm
is below ``threshold`` times the layer's largest filter norm are removed
physically (:mod:`autoslim.surgery`), once; an optional short fine-tune
(``finetune_epochs``, at a tenth of the learning rate) follows. Only layers
whose output is not the network output are regularized and pruned
(``layers: conv`` leaves linear layers alone), and only untied channels: in a
ResNet the internal channels of each block, not the residual stream.

A removed filter does not output zero: behind it a BatchNorm (or the filter's
bias) and the activation still output a constant. The pruned filters are
zeroed, the constant each then outputs is read after its activation, and it is
folded into the consumers' biases (``fold_constants``), so the network's
function is kept: exactly where a consumer is a linear layer or an unpadded
conv, up to the border outputs of a zero-padded conv (see :func:`remove_channels`).

>>> w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # 3 filters of a linear layer
>>> round(pseudo_norm(w).item(), 4)  # v = (5, 0, 5): 10 / sqrt(50)
1.4142
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from autoslim.methods.base import CompressionResult, Method, TrialContext, register_method
from autoslim.surgery import ChannelGroup, channel_groups, remove_channels
from autoslim.train import Callback

EPS = 1e-8
FINETUNE_LR_SCALE = 0.1


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of every output filter (row) of a conv or linear ``weight``."""
    return weight.flatten(1).norm(dim=1)


def pseudo_norm(weight: torch.Tensor, *, grouping: str = "filter", eps: float = EPS) -> torch.Tensor:
    """``||v||_1 / (||v||_2 + eps)`` of the per-filter (or per-kernel) L2 norms ``v`` of ``weight``."""
    if grouping == "filter":
        v = filter_norms(weight)
    elif grouping == "kernel":
        v = weight.reshape(weight.shape[0], weight.shape[1], -1).norm(dim=2).flatten()
    else:
        raise ValueError(f"grouping: unknown value {grouping!r}; accepted: filter, kernel")
    return v.sum() / (v.norm() + eps)


class L1L2Penalty(Callback):
    """Adds ``strength * sum(pseudo_norm(layer.weight))`` over ``layers`` to every training step's loss."""

    def __init__(self, layers: Iterable[nn.Module], *, strength: float, grouping: str = "filter") -> None:
        self.layers, self.strength, self.grouping = list(layers), strength, grouping

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.strength * sum(pseudo_norm(m.weight, grouping=self.grouping) for m in self.layers)


def prunable_groups(model: nn.Module, *, example_input: torch.Tensor, layers: str = "all") -> list[ChannelGroup]:
    """The channel groups this method regularizes and prunes: one producer (``layers``: any, or Conv2d only)
    followed by an activation module. A tied group (a residual stream) is left alone: its removed channel
    would hold a different constant at every consumer, which no single folded value can replace."""
    if layers not in ("all", "conv"):
        raise ValueError(f"layers: unknown value {layers!r}; accepted: all, conv")
    modules = dict(model.named_modules())
    return [g for g in channel_groups(model, example_input=example_input)
            if len(g.producers) == 1 and g.activation is not None
            and (layers == "all" or isinstance(modules[g.producers[0]], nn.Conv2d))]


def small_filters(weight: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """Mask of the filters of ``weight`` whose norm is below ``threshold`` x the largest filter norm.

    >>> small_filters(torch.tensor([[1.0, 0.0], [0.0, 1e-4], [0.0, 0.1]]), threshold=1e-2).tolist()
    [False, True, False]
    """
    norms = filter_norms(weight.detach())
    return norms < threshold * norms.max()


@torch.no_grad()
def zero_and_read_constants(model: nn.Module, pruned: Mapping[str, torch.Tensor], groups: Iterable[ChannelGroup], *,
                            example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero the ``pruned`` filters ({group: channel mask}) of ``model`` in place and return, per group, what
    each channel then outputs after the group's activation (eval mode, mean over the batch and positions:
    a zero filter's channel is one constant, ``act(BN(bias))``)."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for g in groups:
        modules[g.producers[0]].weight[pruned[g.name]] = 0
        handles.append(modules[g.activation].register_forward_hook(
            lambda m, i, out, name=g.name: outputs.__setitem__(name, out.transpose(0, 1).flatten(1).mean(1))))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return outputs


def prune_small_filters(model: nn.Module, groups: Iterable[ChannelGroup], *, threshold: float,
                        example_input: torch.Tensor) -> tuple[nn.Module, dict[str, int]]:
    """Remove the small filters (:func:`small_filters`) of ``groups``, folding their constant outputs into the
    consumers; ``model`` keeps its shapes but its pruned filters are zeroed. Returns the new model and
    the count removed per group."""
    groups = list(groups)
    modules = dict(model.named_modules())
    pruned = {g.name: small_filters(modules[g.producers[0]].weight, threshold=threshold) for g in groups}
    constants = zero_and_read_constants(model, pruned, groups, example_input=example_input)
    keep = {g: torch.nonzero(~mask).flatten() for g, mask in pruned.items()}
    new = remove_channels(model, keep, example_input=example_input, fold_constants=constants)
    return new, {g: int(mask.sum()) for g, mask in pruned.items()}


@register_method
class L1L2(Method):
    name = "l1l2"

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        example = ctx.data.val.x[:8]
        groups = prunable_groups(model, example_input=example, layers=params["layers"])
        modules = dict(model.named_modules())
        penalty = L1L2Penalty([modules[g.producers[0]] for g in groups], strength=params["lambda"],
                              grouping=params["grouping"])
        ctx.train(model, phase="sparse", callbacks=[penalty])
        model, removed = prune_small_filters(model, groups, threshold=params["threshold"], example_input=example)
        ctx.log(f"l1l2: removed {sum(removed.values())} filters "
                f"({', '.join(f'{g} -{n}' for g, n in removed.items() if n)})")
        ctx.train(model, epochs=params["finetune_epochs"], phase="finetune", lr_scale=FINETUNE_LR_SCALE)
        return CompressionResult(model, info={"removed": removed})
