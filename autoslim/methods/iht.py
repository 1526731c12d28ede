"""IHT: skinny networks by iterative hard thresholding (Jin, Yuan, Feng, Yan 2016, arXiv 1607.05423).

Reading implemented (``docs/methods.md`` section 1; the paper's per-layer
ratios and schedules were not checked here)::

    train densely (the study's epochs)
    repeat `cycles` times:
        hard thresholding: keep the top-k weights by magnitude of every prunable
            layer (k = round(keep_ratio * size), at least 1), zero the rest
        sparse phase: train `sparse_epochs` at lr * sparse_lr_scale; the support is fixed
        unless this is the last cycle:
            re-activation: release the mask, train all weights `dense_epochs`

The last phase is sparse, so the deliverable is the sparse network. Prunable
layers are the weights of every ``Conv2d`` and ``Linear`` (biases, BatchNorm
and other tensors stay dense); ``prune_first`` / ``prune_last`` include the
first (input) and last (classifier) of them in module order. Conv layers keep
``keep_ratio``, linear layers ``keep_ratio * linear_keep_factor`` (one ratio
for all when the factor is 1). ``scope: layer`` takes the top-k of each layer;
``scope: global`` takes one top-k over all layers that share a ratio (one
magnitude threshold), so a layer may end up sparser than others or empty.

Given a parameter target (:attr:`autoslim.methods.TrialContext.target`) the
keep ratios are not read: every thresholding keeps the weights of largest
magnitude so that the network's non-zeros (the thresholded weights plus every
parameter left dense: biases, norms, a first or last layer left out) are the
target (:func:`target_masks`: one top-k over all layers under ``scope:
global``, one ratio for all layers under ``scope: layer``, each layer's count
rounded so that the total is exact). A target that is a cap (a warm-start trial
under a budget) keeps the ratios where they fit it.

The mask holds exactly: :class:`MaskCallback` zeroes the pruned weights after
every optimizer step, so momentum and weight decay never regrow them.
Released weights restart from exactly zero, and every phase starts a fresh
optimizer (no stale momentum).

The result is reported as unstructured sparsity: the parameter objective is
the non-zero count and ``size_bytes`` is the size of :func:`autoslim.sparse.sparse_state_dict`
saved with ``torch.save`` (a bit mask plus the non-zero values, about
``density + 1/32`` of the dense file). Unstructured sparsity does NOT lower
latency on a CPU: dense kernels multiply the zeros too (there are no sparse
kernels here), so latency and FLOPs equal the dense network's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from autoslim.errors import UsageError
from autoslim.methods.base import CompressionResult, Method, TrialContext, register_method
from autoslim.selection import SizeTarget, target_line
from autoslim.sparse import sparse_size_bytes
from autoslim.train import Callback

SCOPES = ("layer", "global")


def prunable_layers(model: nn.Module, *, prune_first: bool = True, prune_last: bool = True) -> dict[str, nn.Module]:
    """The ``Conv2d`` and ``Linear`` modules whose weights IHT thresholds, by qualified name, in module order.

    >>> from autoslim.models import create_model
    >>> list(prunable_layers(create_model("lenet5", in_shape=(1, 28, 28), num_classes=10), prune_first=False))
    ['features.conv2', 'classifier.fc1', 'classifier.fc2']
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    names = list(layers)
    drop = set(names[:1] if not prune_first else []) | set(names[-1:] if not prune_last else [])
    return {n: m for n, m in layers.items() if n not in drop}


def magnitude_masks(layers: Mapping[str, nn.Module], *, keep_ratio: float | Mapping[str, float],
                    scope: str = "layer") -> dict[str, torch.Tensor]:
    """Boolean masks of the weights to keep: the top-k by magnitude per layer or per group of equal ratio.

    ``keep_ratio`` is one ratio or one per layer name. A layer (scope ``layer``)
    or a group of layers with the same ratio (scope ``global``) of n weights
    keeps exactly ``max(1, round(ratio * n))`` of them; ties are broken by
    ``torch.topk``.

    >>> layer = nn.Linear(10, 10)
    >>> int(magnitude_masks({"fc": layer}, keep_ratio=0.3)["fc"].sum())
    30
    """
    if scope not in SCOPES:
        raise ValueError(f"scope: unknown value {scope!r}; accepted: {', '.join(SCOPES)}")
    ratios = {n: keep_ratio if isinstance(keep_ratio, (int, float)) else keep_ratio[n] for n in layers}
    groups: dict[Any, list[str]] = {}
    for n in layers:
        groups.setdefault(n if scope == "layer" else ratios[n], []).append(n)
    counts = {key: _kept(ratios[names[0]], sum(layers[n].weight.numel() for n in names))
              for key, names in groups.items()}
    return _top_masks(layers, groups, counts)


def target_masks(layers: Mapping[str, nn.Module], *, keep: int, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Boolean masks keeping ``keep`` weights in all of ``layers`` together, the largest magnitudes: one top-k
    over all layers (scope ``global``), or in each layer the same share of its weights (scope ``layer``: one
    ratio, each layer's count rounded so that they add up to ``keep``; every layer keeps at least one).

    >>> layers = {"a": nn.Linear(10, 10), "b": nn.Linear(10, 3)}
    >>> masks = target_masks(layers, keep=65)
    >>> int(masks["a"].sum()), int(masks["b"].sum())
    (50, 15)
    """
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    if scope == "global":
        counts = {"all": min(max(keep, 0), sum(sizes.values()))}
        groups = {"all": list(layers)}
    else:
        counts, groups = layer_counts(sizes, keep), {n: [n] for n in layers}
    return _top_masks(layers, groups, counts)


def layer_counts(sizes: Mapping[str, int], keep: int) -> dict[str, int]:
    """Per-layer counts of one ratio ``keep / total`` that add up to ``keep`` (largest remainders get the rest),
    each at least 1 and at most the layer's size.

    >>> layer_counts({"a": 10, "b": 20, "c": 30}, 31)
    {'a': 5, 'b': 10, 'c': 16}
    """
    total = sum(sizes.values())
    keep = min(max(keep, len(sizes)), total)
    exact = {n: keep * s / total for n, s in sizes.items()}
    counts = {n: min(sizes[n], max(1, int(e))) for n, e in exact.items()}
    by_remainder = sorted(sizes, key=lambda n: exact[n] - int(exact[n]), reverse=True)
    while (missing := keep - sum(counts.values())) != 0:  # one more (or less) each, largest remainders first
        step = 1 if missing > 0 else -1
        order = by_remainder if step > 0 else by_remainder[::-1]
        for n in [n for n in order if (counts[n] < sizes[n] if step > 0 else counts[n] > 1)][:abs(missing)]:
            counts[n] += step
    return counts


def _top_masks(layers: Mapping[str, nn.Module], groups: Mapping[Any, list[str]],
               counts: Mapping[Any, int]) -> dict[str, torch.Tensor]:
    """Masks keeping the ``counts[g]`` largest magnitudes of the weights of each group ``groups[g]`` together."""
    masks = {}
    for key, names in groups.items():
        flat = torch.cat([layers[n].weight.detach().abs().flatten() for n in names])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, counts[key], sorted=False).indices] = True
        for n, chunk in zip(names, keep.split([layers[n].weight.numel() for n in names])):
            masks[n] = chunk.view_as(layers[n].weight)
    return masks


def _kept(ratio: float, n: int) -> int:
    return min(n, max(1, round(ratio * n)))


class MaskCallback(Callback):
    """Holds pruned weights at exactly zero: zeroes them now and after every optimizer step.

    >>> layer = nn.Linear(4, 4)
    >>> mask = MaskCallback({"fc": layer}, {"fc": torch.eye(4, dtype=torch.bool)})
    >>> int(torch.count_nonzero(layer.weight))
    4
    """

    def __init__(self, layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
        self.pairs = [(layers[n].weight, masks[n].to(layers[n].weight.device)) for n in masks]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self.pairs:
            weight.masked_fill_(~mask, 0.0)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.apply()


@register_method
class IHT(Method):
    """Dense training, then ``cycles`` of hard thresholding + sparse fine-tuning, re-activating between cycles."""

    name = "iht"
    check_params = ("prune_first", "prune_last")
    size_knobs = ("keep_ratio", "linear_keep_factor", "prune_first", "prune_last")
    target_measures = ("params",)

    def starts_from_base(self, params: Mapping[str, Any]) -> bool:
        return True

    def check(self, model: nn.Module, *, example_input: torch.Tensor, params: Mapping[str, Any]) -> None:
        """Refuse a model without a Conv2d or Linear weight to threshold."""
        if not prunable_layers(model, prune_first=params["prune_first"], prune_last=params["prune_last"]):
            raise UsageError(f"iht: {type(model).__name__} has no Conv2d or Linear layer to sparsify "
                             f"(prune_first: {params['prune_first']}, prune_last: {params['prune_last']})")

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        layers = prunable_layers(model, prune_first=params["prune_first"], prune_last=params["prune_last"])
        ratios = {n: params["keep_ratio"] * (params["linear_keep_factor"] if isinstance(m, nn.Linear) else 1.0)
                  for n, m in layers.items()}
        if ctx.target is not None and ctx.target.measure not in self.target_measures:
            raise UsageError(f"iht: a {ctx.target.measure} target cannot be reached by sparsity (dense kernels "
                             "compute the zeros); accepted: a params target")
        ctx.pretrained(model)
        cycles, goal = [], None
        for c in range(1, params["cycles"] + 1):
            masks = magnitude_masks(layers, keep_ratio=ratios, scope=params["scope"])
            if ctx.target is not None:
                masks, goal = self.target_masks(model, layers, masks, target=ctx.target, scope=params["scope"])
            sparse = ctx.train(model, epochs=params["sparse_epochs"], phase=f"sparse{c}",
                               lr_scale=params["sparse_lr_scale"],
                               callbacks=[MaskCallback(layers, masks)])
            cycles.append({"sparse_val_accuracy": sparse[-1]["val_accuracy"] if sparse else None})
            if c < params["cycles"]:
                dense = ctx.train(model, epochs=params["dense_epochs"], phase=f"dense{c}")
                cycles[-1]["dense_val_accuracy"] = dense[-1]["val_accuracy"] if dense else None
        density = {n: round(float(torch.count_nonzero(m.weight)) / m.weight.numel(), 4) for n, m in layers.items()}
        kept = sum(int(torch.count_nonzero(m.weight)) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        ctx.log(f"iht: kept {kept:,} of {total:,} prunable weights ({100 * kept / max(1, total):.1f}%)")
        info = {}
        if goal is not None:
            nonzeros = sum(int(torch.count_nonzero(p)) for p in model.parameters())
            info["target"] = {"measure": "params", "value": ctx.target.value, "selected": nonzeros,
                              "reached": nonzeros <= ctx.target.value, "kept_weights_goal": goal}
            ctx.log(target_line("iht", info["target"]))
        return CompressionResult(model, sparse=True, size_bytes=sparse_size_bytes(model),
                                 info={"density": density, "kept_weights": kept, "prunable_weights": total,
                                       "cycles": cycles, **info})

    @staticmethod
    def target_masks(model: nn.Module, layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor], *,
                     target: SizeTarget, scope: str) -> tuple[Mapping[str, torch.Tensor], int | None]:
        """The masks under a parameter ``target``: the non-zeros of the network (the thresholded weights, plus
        every parameter left dense: biases, norms, layers that ``prune_first``/``prune_last`` keep) at the
        target; under a cap, the rule's ``masks`` where they fit it. Also the count of weights kept (None:
        the rule's masks)."""
        dense = sum(p.numel() for p in model.parameters()) - sum(m.weight.numel() for m in layers.values())
        goal = target.value - dense
        if target.cap and sum(int(m.sum()) for m in masks.values()) <= goal:
            return masks, None
        return target_masks(layers, keep=goal, scope=scope), goal
