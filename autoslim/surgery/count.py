"""The parameter count (or FLOPs) of a model as a function of the channels it keeps, without removing them
(:class:`SizeCount`): what a size target is selected against.

:func:`~autoslim.surgery.remove_channels` slices every parameter along the dims
that hold channel ids, so a parameter keeps ``numel * prod_d kept_d / size_d``
entries, with ``kept_d`` the entries of its dim ``d`` whose channel stays (a
Linear after a flatten repeats a channel once per position; a fixed channel
always stays). The count is then a polynomial of degree two in the groups'
widths (a conv's weight is its output width times its input width), evaluated
here from the same channel analysis as the removal; it equals the count of the
removed model (``tests/test_selection.py`` checks it on several models).

FLOPs are torch's count (:func:`autoslim.measure.count_flops`, a batch of one):
convolutions and Linear layers count ``2 * weight entries * output positions``
per call, so each call adds the term of its weight times twice its output
positions (read off the traced run); what no sliced layer computes (attention
products, ops on fixed channels) is a constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autoslim.measure import count_flops
from autoslim.surgery.analysis import ChannelGroup, _Analysis, _analyse, _Layer

MEASURES = ("params", "flops")


class SizeCount:
    """``count(keep)``: the parameters (``measure="params"``) or FLOPs (``"flops"``) ``model`` has once ``keep``
    ({group: kept channels}) is removed.

    Channels are numbered globally: group ``groups[i]`` holds ``offsets[i]`` to
    ``offsets[i] + size - 1`` (:meth:`index`). :meth:`counts` evaluates many keep
    masks at once (rows of a float tensor, 1 = kept).

    >>> from autoslim.models import create_model
    >>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    >>> pc = SizeCount(model, example_input=torch.zeros(1, 1, 28, 28))
    >>> pc.count({}) == sum(p.numel() for p in model.parameters())
    True
    >>> pc.count({"features.conv2": range(25)})  # conv2 and fc1's inputs lose half of 50 channels
    218555
    >>> SizeCount(model, example_input=torch.zeros(1, 1, 28, 28), measure="flops").count({"features.conv2": range(25)})
    2586000
    """

    def __init__(self, model: nn.Module, *, example_input: torch.Tensor, measure: str = "params") -> None:
        if measure not in MEASURES:
            raise ValueError(f"measure: unknown value {measure!r}; accepted: {', '.join(MEASURES)}")
        self.measure = measure
        analysis = _analyse(model, example_input)
        self.groups: list[ChannelGroup] = list(analysis.groups)
        self.offsets: dict[str, int] = {}
        position: dict[int, int] = {}  # root id -> global channel index
        for g in self.groups:
            self.offsets[g.name] = len(position)
            position.update((r, len(position)) for r in analysis.keys[g.name])
        self.channels = len(position)
        lists: list[list[int]] = []  # every id list a parameter is sliced by
        terms: list[tuple[float, tuple[int, ...]]] = []  # coef * prod(kept of lists[i])
        if measure == "params":
            total, sliced_terms = sum(p.numel() for p in model.parameters()), _sliced_parameters(analysis, model)
        else:
            total = count_flops(model, in_shape=tuple(example_input.shape[1:]))
            sliced_terms = _sliced_flops(analysis, model, batch=example_input.shape[0])
        sliced = 0
        for numel, id_lists in sliced_terms:
            rows = []
            for ids in id_lists:
                rows.append(len(lists))
                lists.append(ids)
            full = torch.tensor([float(len(ids)) for ids in id_lists]).prod().item()
            terms.append((numel / full, tuple(rows)))
            sliced += numel
        self.constant = float(total - sliced)
        self.fixed = torch.zeros(len(lists), dtype=torch.float64)
        self.multiplicity = torch.zeros(len(lists), self.channels, dtype=torch.float64)
        for row, ids in enumerate(lists):
            for r in analysis.roots(ids):
                if r in position:
                    self.multiplicity[row, position[r]] += 1
                else:
                    self.fixed[row] += 1
        self.terms = terms

    def index(self, group: str, channels: Sequence[int] | range) -> list[int]:
        """The global indices of ``channels`` of ``group``."""
        return [self.offsets[group] + int(j) for j in channels]

    def mask(self, keep: Mapping[str, Sequence[int] | range]) -> torch.Tensor:
        """The keep mask (1 = kept) of ``keep``; groups missing from it keep every channel."""
        mask = torch.ones(self.channels, dtype=torch.float64)
        for g in self.groups:
            if g.name in keep:
                mask[self.index(g.name, range(g.size))] = 0.0
                mask[self.index(g.name, keep[g.name])] = 1.0
        return mask

    def counts_of_kept(self, kept: torch.Tensor) -> torch.Tensor:
        """Counts from ``kept`` (rows x id lists: the entries of each id list that stay)."""
        out = torch.full(kept.shape[:1], self.constant, dtype=torch.float64)
        for coef, rows in self.terms:
            out += coef * kept[:, list(rows)].prod(dim=1)
        return out

    def kept(self, masks: torch.Tensor) -> torch.Tensor:
        """The entries of each id list that stay under each keep mask (a row of ``masks``)."""
        return self.fixed + masks @ self.multiplicity.T

    def counts(self, masks: torch.Tensor) -> torch.Tensor:
        """The count under each keep mask (a row of ``masks``, float, 1 = kept)."""
        return self.counts_of_kept(self.kept(masks.to(torch.float64)))

    def count(self, keep: Mapping[str, Sequence[int] | range]) -> int:
        """The count once ``keep`` is removed (:func:`autoslim.surgery.remove_channels`)."""
        return int(round(self.counts(self.mask(keep)[None]).item()))


def _sliced_parameters(analysis: _Analysis, model: nn.Module) -> list[tuple[int, list[list[int]]]]:
    """(numel, the id lists it is sliced by) of every parameter that :func:`remove_channels` slices."""
    out = []
    params = dict(model.named_parameters())
    for name, layer in analysis.layers.items():
        module = model.get_submodule(name)
        for _, p in module.named_parameters():
            lists = _layer_parameter_lists(layer, p)
            if lists:
                out.append((p.numel(), lists))
    for name, dims in analysis.tensors.items():
        if name in params:
            out.append((params[name].numel(), [ids for _, ids in sorted(dims.items())]))
    return out


def _sliced_flops(analysis: _Analysis, model: nn.Module, *, batch: int) -> list[tuple[float, list[list[int]]]]:
    """(FLOPs, the id lists they scale with) of every call of a sliced convolution or Linear layer."""
    out = []
    for node in analysis.module.graph.nodes:
        layer = analysis.layers.get(node.target) if node.op == "call_module" else None
        if layer is None or layer.out_ids is None or node not in analysis.shapes:
            continue
        weight = model.get_submodule(node.target).weight
        shape = analysis.shapes[node]
        positions = math.prod(shape) / shape[layer.dim] / batch
        out.append((2 * positions * weight.numel(), _layer_parameter_lists(layer, weight)))
    return out


def _layer_parameter_lists(layer: _Layer, p: torch.Tensor) -> list[list[int]]:
    """The id lists a layer's parameter ``p`` is sliced by: its dim 0 by the output channels (per-channel layers
    and depthwise convs: the channels they see), its dim 1 by the input channels of a conv/Linear weight."""
    out_ids = layer.in_ids if layer.out_ids is None else layer.out_ids
    lists = []
    if p.dim() >= 1 and p.shape[0] == len(out_ids):
        lists.append(out_ids)
    if layer.out_ids is not None and layer.out_ids is not layer.in_ids and p.dim() >= 2 \
            and p.shape[1] == len(layer.in_ids) > 1:
        lists.append(layer.in_ids)
    return lists
