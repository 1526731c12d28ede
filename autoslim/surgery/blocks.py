"""Residual blocks: finding every ``x + f(x)`` of a submodule (:func:`residual_branches`) and replacing a
block by its shortcut (:func:`remove_blocks`).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as tv_resnet

from autoslim.errors import UsageError, accepted
from autoslim.models import resnet as autoslim_resnet
from autoslim.surgery.analysis import ChannelGroup, RemovalError, _CONVS, _PASS_MODULES, _traced, probe
from autoslim.surgery.remove import copy_model, remove_channels, scales_exactly

class ShortcutPath(nn.Sequential):
    """What is left of a removed residual block: its shortcut and its output activation.

    Empty (the identity) when the shortcut is the identity: the block input
    follows a ReLU in the supported ResNets, so ``relu(x) == x``.
    """


class ResidualShortcut(nn.Module):
    """A block whose residual branches ``removed`` are gone: each ``x + f(x)`` became ``x``.

    ``kept`` is the block's :mod:`torch.fx` graph (traced in eval mode) with
    those sums rewritten and the branches' layers dropped (dead-code
    elimination); whatever followed a sum (an activation) still runs.
    """

    def __init__(self, kept: fx.GraphModule, removed: tuple[str, ...]) -> None:
        super().__init__()
        self.kept, self.removed = kept, removed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.kept(*args, **kwargs)


@dataclass(frozen=True)
class ResidualBranch:
    """A residual sum ``x + f(x)`` in the forward of module ``block``; removing the branch leaves ``x``.

    ``name`` is ``block``, or ``block[index]`` when the block's forward holds
    several residual sums (``index`` counts them in order). ``scale_site`` is
    the layer whose output ends ``f`` (its last convolution, Linear or
    normalisation layer, reached back through dropout, stochastic depth, a
    constant scale or a permute), called once per forward, where a factor can
    scale the whole branch and be folded into the layer's parameters exactly
    (:func:`scale_output_channels`); None if there is none.
    """

    name: str
    block: str
    index: int
    scale_site: str | None


_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MULS = {operator.mul, torch.mul, "mul"}
_SCALE_PASS_MODULES = (*_PASS_MODULES, torchvision.ops.StochasticDepth)
_SCALE_PASS_FUNCTIONS = {F.dropout, torchvision.ops.stochastic_depth, torch.permute, torch.flatten, torch.reshape,
                         "permute", "contiguous", "flatten", "transpose", "view", "reshape"}
_FOLDABLE = (*_CONVS, nn.Linear, _BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _shortcut_and_branch(a: fx.Node, b: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(x, f(x))`` of a sum of ``a`` and ``b``: one feeds the other, or both read the block input on separate
    paths and the shorter is the shortcut (a projection); None if the sum is not residual."""
    up_a, up_b = _ancestors(a), _ancestors(b)
    if a in up_b:
        return a, b
    if b in up_a:
        return b, a
    common = up_a & up_b
    if a is b or not common or any(n.op != "placeholder" for n in common) or len(up_a) == len(up_b):
        return None
    return (a, b) if len(up_a) < len(up_b) else (b, a)


def _block_sums(block: nn.Module) -> tuple[fx.GraphModule, list[tuple[fx.Node, fx.Node, fx.Node]]] | None:
    """The block's own trace (eval mode) and its residual sums ``(sum, shortcut, branch)`` in order; None if
    the block cannot be traced on its own."""
    try:
        traced = _traced(block)
    except UsageError:
        return None
    sums = []
    for n in traced.graph.nodes:
        if n.op not in ("call_function", "call_method") or n.target not in _ADDS or n.meta.get("nn_module_stack"):
            continue  # not a sum, or one inside a child module (a block of its own)
        operands = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        pair = _shortcut_and_branch(*operands) if len(operands) == 2 and "alpha" not in n.kwargs else None
        if pair is not None:
            sums.append((n, *pair))
    return traced, sums


def _scale_site(block: nn.Module, branch: fx.Node) -> str | None:
    """The layer (relative to ``block``) whose output, scaled, scales the whole ``branch``; None if none."""
    node = branch
    while len(node.users) == 1:
        if node.op == "call_module":
            m = block.get_submodule(node.target)
            if isinstance(m, _FOLDABLE):
                return node.target if scales_exactly(m) else None
            if not isinstance(m, _SCALE_PASS_MODULES):
                return None
        elif node.op in ("call_function", "call_method") and node.target in _MULS:
            tensors = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
            if len(tensors) != 1:
                return None
            node = tensors[0]
            continue
        elif node.op not in ("call_function", "call_method") or node.target not in _SCALE_PASS_FUNCTIONS:
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def residual_branches(model: nn.Module) -> list[ResidualBranch]:
    """Every residual sum ``x + f(x)`` in the forward of a submodule of ``model`` called once, in execution order.

    A sum is residual when one operand feeds the other (``x + f(x)``, also
    ``x + f(y)`` with ``y`` computed from ``x``), or both read the block input
    on separate paths (``proj(x) + f(x)``: the shorter path is the shortcut).
    The branches of torchvision's BasicBlock/Bottleneck, of autoslim's
    BasicBlock, of MobileNet/EfficientNet/MNASNet inverted residuals, RegNet,
    ConvNeXt, ViT and Swin blocks are found this way. Sums written in the
    model's own forward (not in a submodule) are not listed: a block is a module.

    >>> import torchvision
    >>> branches = residual_branches(torchvision.models.resnet18(num_classes=10))
    >>> len(branches), branches[0].name, branches[0].scale_site
    (8, 'layer1.0', 'layer1.0.bn2')
    """
    branches = []
    for name in _blocks(model):
        block = model.get_submodule(name)
        found = _block_sums(block)
        sums = found[1] if found else []
        calls = Counter(n.target for n in found[0].graph.nodes if n.op == "call_module") if found else Counter()
        for k, (_, _, branch) in enumerate(sums):
            site = _scale_site(block, branch)
            site = f"{name}.{site}" if site is not None and calls[site] == 1 else None
            branches.append(ResidualBranch(name if len(sums) == 1 else f"{name}[{k}]", name, k, site))
    return branches


def _blocks(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` whose own forward holds a sum, in order; modules called more than
    once are left out."""
    graph = _traced(model).graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    repeated = {key.split("@")[0] for n in graph.nodes for key in (n.meta.get("nn_module_stack") or {})
                if "@" in key} | {t for t, c in calls.items() if c > 1}
    names = [list(n.meta["nn_module_stack"].values())[-1][0] for n in graph.nodes
             if n.op in ("call_function", "call_method") and n.target in _ADDS and n.meta.get("nn_module_stack")]
    return [name for name in dict.fromkeys(names) if name not in repeated]


def _shortcut_path(block: nn.Module) -> ShortcutPath | None:
    if isinstance(block, autoslim_resnet.BasicBlock):
        shortcut, act = block.shortcut, block.relu2
    elif isinstance(block, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
        shortcut, act = block.downsample, block.relu
    else:
        return None
    return ShortcutPath() if shortcut is None or isinstance(shortcut, nn.Identity) else ShortcutPath(shortcut, act)


def remove_blocks(model: nn.Module, block_names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` in which each named residual branch (:func:`residual_branches`) is removed.

    ``act(branch(x) + shortcut(x))`` becomes ``act(shortcut(x))``, exact when
    the branch outputs zero. autoslim's BasicBlock and torchvision's
    ``BasicBlock``/``Bottleneck`` are replaced by a :class:`ShortcutPath`
    (the identity for an identity shortcut); any other block by a
    :class:`ResidualShortcut` (its graph with the sums rewritten to their
    shortcut and the branches' layers dropped), the same for the same names,
    so :func:`apply_architecture_spec` redoes it. ``model`` is not modified.

    >>> from autoslim.models import create_model
    >>> model = create_model("resnet20", in_shape=(3, 32, 32), num_classes=10)
    >>> type(remove_blocks(model, ["layer1.1"]).layer1[1]).__name__
    'ShortcutPath'
    """
    new = copy_model(model)
    modules = dict(new.named_modules())
    generic: dict[str, dict[int | None, str]] = {}
    for name in block_names:
        block, _, index = name.removesuffix("]").partition("[")
        if not block or block not in modules or (index and not index.isdigit()):
            raise accepted("block", name, [b.name for b in residual_branches(model)])
        path = _shortcut_path(modules[block])
        if path is not None and not index:
            parent, _, child = block.rpartition(".")
            setattr(new.get_submodule(parent), child, path)
        else:
            generic.setdefault(block, {})[int(index) if index else None] = name
    for block, chosen in generic.items():
        _remove_sums(new, block, chosen)
    return new


def _remove_sums(model: nn.Module, name: str, chosen: Mapping[int | None, str]) -> None:
    """Replace block ``name`` of ``model`` by a :class:`ResidualShortcut` without the sums ``chosen``
    ({index, or None for the block's only sum: branch name})."""
    block = model.get_submodule(name)
    found = _block_sums(block)
    sums = found[1] if found else []
    valid = {None: name} if len(sums) == 1 else {k: f"{name}[{k}]" for k in range(len(sums))}
    if not sums or any(k not in valid for k in chosen):
        what = "holds no residual sum x + f(x)" if not sums else f"has residual branches {', '.join(valid.values())}"
        raise UsageError(f"surgery: '{name}' ({type(block).__name__}) {what}; cannot remove "
                         f"{', '.join(chosen.values())}")
    traced = found[0]
    for k in chosen:
        add, _, branch = sums[k or 0]
        shortcut = next(a for a in add.args[:2] if a is not branch)  # as it reads now: an earlier sum may be gone
        add.replace_all_uses_with(shortcut)
        traced.graph.erase_node(add)
    traced.graph.eliminate_dead_code()
    kept = fx.GraphModule(block, traced.graph)  # holds only the layers and tensors the graph still uses
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, ResidualShortcut(kept, tuple(sorted(chosen.values()))))


def check_removal(model: nn.Module, *, example_input: torch.Tensor, groups: Sequence[ChannelGroup] = (),
                  blocks: Sequence[str] = ()) -> None:
    """Refuse, in one UsageError line naming the layer or op, a model whose channels or branches cannot be removed.

    A dry run before any training: the first channel (the first block of
    ``granularity`` channels) of each of ``groups`` (of
    :func:`channel_groups` on ``model``) and every residual branch in
    ``blocks`` (:func:`residual_branches`) are removed from a copy, which must
    run on ``example_input``.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> from autoslim.surgery import channel_groups
    >>> model, x = create_model("resnet20", in_shape=(3, 8, 8), num_classes=3), torch.randn(1, 3, 8, 8)
    >>> check_removal(model, example_input=x, groups=channel_groups(model, example_input=x)[:1],
    ...               blocks=["layer1.0", "layer2.0"])
    """
    keep = {g.name: range(g.granularity, g.size) for g in groups if g.size > g.granularity}
    small = remove_channels(model, keep, example_input=example_input)
    if blocks:
        try:
            probe(remove_blocks(small, blocks), [example_input])
        except RemovalError as e:
            raise RemovalError(f"surgery: the model without its residual branches {', '.join(blocks)} does not "
                               f"run: {e}; please report this model") from e
