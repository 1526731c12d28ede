"""Dependency-aware physical removal of channels, neurons and residual blocks.

Implementation choice: our own graph analysis on :mod:`torch.fx`, not
``torch-pruning`` 1.6.1 (DepGraph), and so no new dependency. Measured on the
same models with a third of every group's channels zeroed and then removed
(random BatchNorm statistics, relative output error against the masked model,
CPU time of the whole removal, one thread, best of 5):

    model (input)                     params after   surgery          torch-pruning
    lenet5 (1x28x28)                  197,678        14 ms  5e-7      13 ms  5e-7
    lenet5 (1x8x8)                     61,406        12 ms  4e-7       8 ms  4e-7
    lenet300_100                      171,147         9 ms  1e-7       4 ms  1e-7
    vgg11 width 0.25 (3x32x32)        262,400        26 ms  2e-7      19 ms  2e-7
    resnet20                          125,200        56 ms  3e-7      34 ms  3e-7
    resnet56                          392,056       156 ms  3e-7     104 ms  3e-7
    torchvision resnet18 (3x32x32)  4,998,822       120 ms  6e-7      84 ms  6e-7
    torchvision mobilenet_v2        1,022,520       170 ms  3e-7     174 ms  3e-7
    user model: concat of two convs,    1,150        13 ms  6e-8     broken model
      AdaptiveAvgPool2d(2), flatten

Where torch-pruning works both remove the same channels down to the same
parameter count, and it is up to 2.3x faster (our time includes a check
forward pass of the result). But it prunes the wrong channels when a
concatenation is followed by pooling to more than 1x1 and a flatten (it also
cuts the other concatenated branch: the model no longer runs), and it cuts
through a custom module that owns a parameter instead of refusing it. It
also gives none of the rest we need: the activation where APoZ is measured,
block removal, constant folding, an architecture spec. The ops added since
(issue 16) were measured the same way by ``benchmarks/bench_surgery_ops.py``
(``MagnitudePruner``, L1, ratio 1/3; the hand-written models are those of
``tests/test_surgery_ops.py``)::

    model (input)                     params after   surgery          torch-pruning
    shufflenet_v2_x0_5 (3x32x32)      239,694       466 ms  4e-7     ZeroDivisionError
    convnext_tiny (3x32x32)        19,192,810      1542 ms  2e-6     prunes through LayerNorm: error 1
    swin_t (3x32x32)               21,770,372      1065 ms  5e-7     not done after 3 minutes
    GroupNorm + PReLU                     607        34 ms  0        RuntimeError (LayerNorm shape)
    custom per-channel scales             460        50 ms  4e-8     RuntimeError (shape mismatch)
    view(N, 8, 1, 1), literal 8           761        30 ms  0        RuntimeError in view
    weight_norm / spectral_norm       448 / 566   29 / 22 ms  6e-8     KeyError ('weight' exists)
    permute, LayerNorm, MLP, permute      680        25 ms  3e-8     error 6e-1 (cuts LayerNorm's channels)
    upsample, interpolate, pad            482        34 ms  0        error 2e-1
    SE gate through view(N, C, 1, 1)      615        50 ms  3e-8     error 7e-2
    Conv1d                                256        21 ms  0        error 2e-2 (removes 1/3 rounded up)

so autoslim keeps its one engine for every model.

How it works: the model is traced with :mod:`torch.fx` (standard layers are
one call; custom modules are traced into, also those that own parameters,
unless fx cannot trace them: then they stay opaque) and run once on
``example_input``. Every channel gets an id, and every tensor carries, per
dim, the ids laid along that dim (none on batch and spatial dims), so a
channel may sit on dim 1 (convolutions), on the last dim (a Linear on tokens
``(N, L, D)`` or on a channel-last map ``(N, H, W, C)``) or move between them
(``permute``/``transpose``). Ops that tie channels (a residual sum, a depthwise
conv, BatchNorm, an activation, pooling) unite the ids in a union-find; a
concatenation lays ids side by side; a reshape maps them with the dims it
merges or splits (a flatten repeats each id once per spatial position). A
:class:`ChannelGroup` is the set of convolution/Linear layers whose output
channels share the same ids in the same order. Channels that reach the
network output, the model input, a parameter the analysis cannot slice, an
op that mixes them, or a grouped (non-depthwise) conv are fixed and belong to
no group. An op the analysis does not know refuses the whole model, in one
line naming it, if a group's channels reach it. Removal then slices every
layer by the ids it sees, so consumers lose exactly the matching inputs, and
runs the reduced model once, checking every tensor's shape against the
analysis (a mismatch names the op).

What each op does to the channels (exact against the masked model wherever
channels stay removable):

- pass: activations, dropout, pooling and ``F.interpolate``/``nn.Upsample``
  (over spatial dims), ``F.pad`` of spatial dims, elementwise ops,
  ``permute``/``transpose``/``movedim``/``.T``, ``unsqueeze``/``squeeze``.
- sliced: Conv1d/Conv2d/Conv3d (plain or depthwise), Linear on the last dim
  of any input, BatchNorm, PReLU with one weight per channel, and a custom
  module's parameter or buffer that broadcasts against a map along its
  channel dim (ConvNeXt's ``layer_scale`` of shape (C, 1, 1), a user's
  ``nn.Parameter(torch.ones(C))`` viewed as (1, C, 1, 1)); under
  ``weight_norm`` (old hooks or ``parametrizations``) ``g`` and ``v`` are
  sliced and ``g`` rescaled so that the kept weights do not change; under
  ``spectral_norm`` the weight and its ``u`` vector lose output channels.
- blocks: GroupNorm removes only whole groups (the other groups' statistics
  do not change): its channel group gets ``granularity`` = channels per
  GroupNorm group and ``num_groups`` shrinks.
- fixed: channels normalised by a LayerNorm (its statistics over the
  channels change when zeros leave them, so removal is not exact; we chose
  to keep them rather than approximate), by GroupNorm with one group, by a
  spectral-normed layer's input (removing input columns changes sigma: 0.56
  median relative output error over 20 random convs with the stored ``u``,
  ``v``, and the true sigma drops by 17% when 3 of 8 inputs go), softmax or a
  reduction over channels, a padding of the channel dim (the new channels),
  reshapes whose channel dim has a literal size (``view(N, 16, 1, 1)`` cannot
  follow a removal), ``split`` into literal sizes, ``unbind``, and a slice or
  ``narrow`` with literal bounds: the channels before a bound counted from the
  front (after one counted from the back) stay, so the same bound picks the
  same channels; bounds computed at run time or a step fix the whole dim.
- tied: ``chunk`` (and ``split`` by a size computed at run time) ties each
  position of a part to the same position of the others, so that every part
  loses the same positions; a channel shuffle (``nn.ChannelShuffle``,
  ``F.channel_shuffle``, or ShuffleNet's view/transpose/view, where a channel
  dim is split into a literal and a computed part) ties channel ``j`` of
  every shuffle group.

Limits: removable groups are whole producers: a group with one fixed or
repeated channel is not offered, so a producer whose output is sliced with
literal bounds, chunked (ShuffleNet's split ties its two halves), or concatenated with
padding channels into a residual sum keeps all its channels (ShuffleNet keeps
its branches' inner widths removable, ConvNeXt and Swin their MLP widths).
The parts of a concatenation stay separate groups (each consumer loses the
matching slice). Grouped convs, and a depthwise conv after a concatenation,
keep the channels they see (no group). Advanced indexing, ``torch.roll``/
``flip``, ``einsum``/``matmul`` and attention layers, LSTMs,
LocalResponseNorm, other weight parametrizations, functional convolutions or
norms on a custom module's parameters, and custom modules fx cannot trace
refuse the model, naming the op, when a group's channels reach them.

What the methods read off the analysis: every activation call a group's
channels pass through (:attr:`ChannelGroup.sites`: modules called once or
several times, as torchvision's ResNet blocks reuse one ReLU, and functions
such as ``F.relu`` or ``x.relu()``, on whatever dim the channels sit);
:func:`probe` reads the values there, or at any layer's input, on the traced
model; :func:`constant_inputs` what each consumer reads from channels that no
longer depend on the input, folded per consumer by :func:`remove_channels`;
:func:`residual_branches` every ``x + f(x)`` of a submodule, removed by
:func:`remove_blocks`. A removal that fails, or whose result does not run, is
refused in one line (:class:`RemovalError`, a UsageError) naming the layer or
op; :func:`check_removal` is that removal as a dry run before training.

>>> import torch
>>> from autoslim.models import create_model
>>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
>>> x = torch.randn(2, 1, 28, 28)
>>> [(g.name, g.size) for g in channel_groups(model, example_input=x)]
[('features.conv1', 20), ('features.conv2', 50), ('classifier.fc1', 500)]
>>> small = remove_channels(model, {"features.conv2": range(25)}, example_input=x)
>>> small.classifier.fc1
Linear(in_features=400, out_features=500, bias=True)
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.padding import _ConstantPadNd
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torchvision.models import resnet as tv_resnet

from autoslim.errors import UsageError, accepted
from autoslim.heads import apply_heads_spec, heads_spec
from autoslim.models import resnet as autoslim_resnet

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
          2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
          3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)}
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
                   F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
                   F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3}
_PADS = (_ConstantPadNd, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
         nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
# layers whose parameters the surgery slices: traced as one call when they keep torch's own forward
_LAYERS = (*_CONVS, nn.Linear, _BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
_ELEMENTWISE = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.logsigmoid, F.dropout, F.dropout1d,
                F.dropout2d, F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
                torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf, operator.neg,
                torchvision.ops.stochastic_depth,  # scales whole examples: keeps channels
                "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clamp_min",
                "clamp_max", "abs", "exp", "sqrt", "rsqrt", "square", "neg", "erf", "contiguous", "clone",
                "detach", "float", "double", "half", "bfloat16", "to", "type_as"}
# the elementwise functions that are nonlinearities: where a channel's values pass one (APoZ is measured there)
_ACT_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                  F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, torch.relu, torch.sigmoid, torch.tanh,
                  torch.clamp, torch.clip, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp",
                  "clamp_", "clip", "clamp_min"}
_DTYPE_ONLY = {"to", "type_as"}  # a second tensor argument only gives the dtype/device
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
           torch.pow, torch.maximum, torch.minimum, torch.where, operator.gt, operator.ge, operator.lt,
           operator.le, operator.eq, operator.ne, "add", "sub", "mul", "div", "pow", "add_", "sub_", "mul_",
           "div_", "maximum", "minimum"}
_SOFTMAX = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var,
           "mean", "sum", "amax", "amin", "max", "min", "std", "var"}
_RESHAPE = {torch.reshape, "view", "reshape", torch.flatten, "flatten", torch.unflatten, "unflatten",
            torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", "view_as", "reshape_as"}
_PERMUTE = {torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims,
            "swapdims", torch.movedim, "movedim", torch.moveaxis, "moveaxis", torch.t, "t"}
_TRANSPOSE_ATTRIBUTES = ("T", "mT", "H", "mH")
# ops through which a parameter stays recognisable (its channel axis can be followed to a product)
_PARAMETER_PATH = _ELEMENTWISE | _BINARY | {torch.reshape, "view", "reshape", torch.squeeze, "squeeze",
                                            torch.unsqueeze, "unsqueeze", operator.getitem}

Dim = Optional[list[int]]  # the channel ids along one dim of a tensor, or None: no removable channels there
Ids = tuple[Dim, ...]  # one entry per dim; a tuple/list output has a list of Ids


@dataclass(frozen=True)
class ActivationSite:
    """An activation call (a module, called once or several times, or a function: one fx node) that some of a
    group's channels pass through.

    ``node`` is the name of the node in the :mod:`torch.fx` trace of the model
    (see :func:`probe`); ``dim`` the dim of its output along which the
    channels lie; ``channels[i]`` is the group channel that entry ``i`` along
    ``dim`` holds, or -1 for an entry of another group (a concatenation) or a
    fixed channel. After a flatten one channel fills several entries.
    """

    node: str
    channels: tuple[int, ...]
    dim: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together.

    ``name`` is the qualified name of the first producer in execution order and
    is the key of ``keep`` in :func:`remove_channels`. ``producers`` are the
    convolution/Linear layers (depthwise convs included) whose output channel
    ``j`` is channel ``j`` of the group: more than one when a residual sum or a
    depthwise conv ties them. ``batchnorms`` are the BatchNorm layers, and
    ``groupnorms`` the GroupNorm layers, that see exactly these channels in
    this order. ``sites`` are every activation call the group's channels pass
    through (where Network Trimming measures APoZ): modules and functions
    (``F.relu``, ``x.relu()``) alike, one per call of a module used several
    times, several for a residual stream. ``granularity`` > 1 when the
    channels reach a GroupNorm: they can only be removed in whole GroupNorm
    groups, channel ``j`` lying in block ``j // granularity``. ``channel_dim``
    is the dim of the first producer's output that holds the channels: 1 for a
    convolution ``(N, C, ...)``, the last dim for a Linear (``(N, F)``, tokens
    ``(N, L, D)``, channel-last maps).
    """

    name: str
    producers: tuple[str, ...]
    size: int
    sites: tuple[ActivationSite, ...] = ()
    batchnorms: tuple[str, ...] = ()
    granularity: int = 1
    channel_dim: int = 1
    groupnorms: tuple[str, ...] = ()

    @property
    def activations(self) -> tuple[str, ...]:
        """The fx node names of :attr:`sites`."""
        return tuple(s.node for s in self.sites)


@dataclass
class _Layer:
    """The channel ids a sliceable layer reads (``in_ids``) and writes (``out_ids``) along its dim ``dim``."""

    in_ids: list[int]
    out_ids: list[int] | None  # None for per-channel layers (BatchNorm, GroupNorm, PReLU): their channels are in_ids
    dim: int


class _UnionFind:
    """Channel ids; id 0 stands for every fixed channel and stays the root of its set."""

    def __init__(self) -> None:
        self.parent = [0]

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: Sequence[int], b: Sequence[int]) -> None:
        for x, y in zip(a, b, strict=True):
            lo, hi = sorted((self.find(x), self.find(y)))
            self.parent[hi] = lo

    def fix(self, ids: Dim) -> None:
        if ids:
            self.union(ids, [0] * len(ids))

    def roots(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a tensor of ids) with every id replaced by its root."""
        values, inverse = torch.unique(t, return_inverse=True)
        return torch.tensor([self.find(i) for i in values.tolist()], dtype=torch.long)[inverse]


def _torch_forward(m: nn.Module) -> bool:
    """Whether ``m`` runs a forward of torch.nn itself (a subclass may only change its construction)."""
    return type(m).forward.__module__.startswith("torch.nn.")


class _Tracer(fx.Tracer):
    """Traces into custom modules, even those that own parameters, unless ``opaque`` lists them.

    Standard layers (also a user's subclass that keeps torch's forward) are one call each.
    """

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _LAYERS) and _torch_forward(m)) or super().is_leaf_module(m, qualname) \
            or id(m) in self.opaque


def _trace(model: nn.Module) -> fx.Graph:
    """The graph of ``model``; custom modules that own parameters and that torch.fx cannot trace stay opaque."""
    opaque: set[int] = set()
    for m in reversed(list(model.modules())):  # inner modules first
        if m is not model and next(m.parameters(recurse=False), None) is not None \
                and not m.__module__.startswith("torch.nn") and not (isinstance(m, _LAYERS) and _torch_forward(m)):
            try:
                _Tracer(opaque).trace(m)
            except Exception:  # fx raises many types for untraceable Python
                opaque.add(id(m))
    return _Tracer(opaque).trace(model)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, restoring every module's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _where(node: fx.Node, module: nn.Module | None) -> str:
    """Name an op for an error message: the layer, or the function and the module it runs in."""
    if module is not None:
        return f"layer '{node.target}' ({type(module).__name__})"
    target = getattr(node.target, "__name__", node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return f"operation '{target}'"
    path, cls = list(stack.values())[-1]
    return f"operation '{target}' in '{path}' ({getattr(cls, '__name__', cls)})"


def _is_shape_query(n: fx.Node, out: Any) -> bool:
    return (n.target is getattr and not isinstance(out, torch.Tensor)) \
        or (n.op == "call_method" and n.target in ("size", "dim"))


def _none_like(out: Any) -> Ids | list | None:
    """Ids of an output with no removable channels."""
    if isinstance(out, torch.Tensor):
        return (None,) * out.dim()
    if isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out):
        return [_none_like(o) for o in out]
    return None


class RemovalError(UsageError, RuntimeError):
    """A removal that cannot be done, or whose result does not run: one line naming the layer or op."""


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line, without the graph dump torch.fx appends to an op's error."""
    return " ".join(str(e).split("\n\nWhile executing")[0].split())


def _traced(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by :func:`_trace` in eval mode (what ``self.training`` decides is fixed at tracing: the
    graph is the one every analysis and probe runs); a UsageError line if torch.fx cannot trace it."""
    try:
        with _eval_mode(model):
            return fx.GraphModule(model, _trace(model))
    except Exception as e:  # fx raises many types for untraceable Python
        raise UsageError(f"surgery: {type(model).__name__} cannot be traced by torch.fx: {_one_line(e)}") from e


def _analyse(model: nn.Module, example_input: torch.Tensor) -> _Analysis:
    module = _traced(model)
    try:
        return _Analysis(module, model, _on_device_of(model, example_input))
    except UsageError:
        raise
    except Exception as e:  # the model fails on the input, or an op trips the analysis: one line either way
        raise UsageError(f"surgery: the channel analysis of {type(model).__name__} failed: {type(e).__name__}: "
                         f"{_one_line(e)}") from e


def _on_device_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of ``model``'s parameters (a CUDA batch for a CPU model, or the reverse)."""
    p = next(model.parameters(), None)
    return x if p is None else x.to(p.device)


class _Probe(fx.Interpreter):
    """Runs a traced model, handing node outputs and layer inputs to callbacks; an op that fails raises a
    :class:`RemovalError` naming it."""

    def __init__(self, module: fx.GraphModule, *, nodes: Collection[str] = (), layer_inputs: Collection[str] = (),
                 on_output: Callable[[str, Any], None] | None = None,
                 on_input: Callable[[str, torch.Tensor], None] | None = None) -> None:
        super().__init__(module)
        self.nodes, self.layer_inputs = set(nodes), set(layer_inputs)
        self.on_output, self.on_input = on_output, on_input
        self.extra_traceback = False  # the error names the op; no graph dump

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.target in self.layer_inputs and n.args and isinstance(n.args[0], fx.Node):
            self.on_input(n.target, self.env[n.args[0]])
        try:
            out = super().run_node(n)
        except Exception as e:
            module = self.module.get_submodule(n.target) if n.op == "call_module" else None
            raise RemovalError(f"{_where(n, module)} fails: {_one_line(e)}") from e
        self.seen(n, out)
        if n.name in self.nodes:
            self.on_output(n.name, out)
        return out

    def seen(self, n: fx.Node, out: Any) -> None:
        """Called with every node's output (a subclass checks it)."""


def probe(model: nn.Module, batches: Iterable[torch.Tensor], *, nodes: Collection[str] = (),
          layer_inputs: Collection[str] = (), on_output: Callable[[str, Any], None] | None = None,
          on_input: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Run ``model`` on each of ``batches`` (eval mode, no gradients) through its :mod:`torch.fx` trace.

    ``on_output(node, value)`` receives the output of every node named in
    ``nodes`` (:attr:`ActivationSite.node`), ``on_input(layer, value)`` the
    input of every call of a layer named in ``layer_inputs``, as they are
    computed: reduce them at once (an in-place op later on may change them).
    The model runs in eval mode, so dropout is off. An op that fails raises a
    :class:`RemovalError` naming it.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> model = create_model("lenet5", in_shape=(1, 8, 8), num_classes=3)
    >>> site = channel_groups(model, example_input=torch.zeros(1, 1, 8, 8))[0].sites[0]
    >>> seen = {}
    >>> probe(model, [torch.randn(4, 1, 8, 8)], nodes=[site.node], layer_inputs=["features.conv2"],
    ...       on_output=lambda n, v: seen.setdefault(n, v.shape), on_input=lambda n, v: seen.setdefault(n, v.shape))
    >>> seen
    {'features_relu1': torch.Size([4, 20, 8, 8]), 'features.conv2': torch.Size([4, 20, 4, 4])}
    """
    _probe(_traced(model), model, batches, nodes=nodes, layer_inputs=layer_inputs, on_output=on_output,
           on_input=on_input)


def _probe(module: fx.GraphModule, model: nn.Module, batches: Iterable[torch.Tensor], **callbacks: Any) -> None:
    """:func:`probe` on ``module``, the trace of ``model``."""
    interpreter = _Probe(module, **callbacks)
    with _eval_mode(model):
        for x in batches:
            interpreter.run(_on_device_of(model, x))


def _segments(xs: Sequence[int], os: Sequence[int]) -> list[tuple[range, range]]:
    """Split a reshape from shape ``xs`` to ``os`` into runs of dims with equal products.

    >>> _segments((2, 6, 4), (2, 3, 2, 4))
    [(range(0, 1), range(0, 1)), (range(1, 2), range(1, 3)), (range(2, 3), range(3, 4))]
    """
    segments, i, j = [], 0, 0
    while i < len(xs) or j < len(os):
        i0, j0, pi, pj = i, j, 1, 1
        if i < len(xs):
            pi, i = xs[i], i + 1
        if j < len(os):
            pj, j = os[j], j + 1
        while pi != pj:
            if pi < pj and i < len(xs):
                pi, i = pi * xs[i], i + 1
            elif pj < pi and j < len(os):
                pj, j = pj * os[j], j + 1
            else:
                return [(range(len(xs)), range(len(os)))]
        segments.append((range(i0, i), range(j0, j)))
    return segments


def _literal_sizes(sizes: Any) -> set[int]:
    """Positions in a size argument given as a literal int (not -1, not computed from a tensor's shape)."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return {k for k, s in enumerate(sizes) if isinstance(s, int) and s != -1}


def _weight_kind(m: nn.Module) -> str | None:
    """How ``m`` stores its weight: "plain", "weight_norm" or "spectral_norm" (over output channels,
    old hooks or parametrizations), or None for anything the surgery cannot slice."""
    if parametrize.is_parametrized(m):
        plist = m.parametrizations
        if list(plist.keys()) != ["weight"] or len(plist.weight) != 1 or getattr(plist.weight[0], "dim", None) != 0:
            return None
        norm = plist.weight[0]
        return "weight_norm" if isinstance(norm, parametrizations._WeightNorm) \
            else "spectral_norm" if isinstance(norm, parametrizations._SpectralNorm) else None
    hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
    if not hooks:
        return "plain"
    if len(hooks) > 1 or hooks[0].name != "weight" or hooks[0].dim != 0:
        return None
    return "weight_norm" if isinstance(hooks[0], WeightNorm) else "spectral_norm"


class _Analysis(fx.Interpreter):
    """Runs the traced model once and records which channel ids each layer reads and writes.

    Every tensor carries, per dim, the channel ids laid along that dim (:data:`Ids`); ids that must be
    removed together are united in a union-find, where id 0 stands for channels that must stay.
    """

    def __init__(self, module: fx.GraphModule, root: nn.Module, example_input: torch.Tensor) -> None:
        super().__init__(module)
        self.root = root
        self.uf = _UnionFind()
        self.ids: dict[fx.Node, Any] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.layers: dict[str, _Layer] = {}
        self.tensors: dict[str, dict[int, list[int]]] = {}  # custom parameter/buffer -> {its dim: channel ids}
        self.origins: dict[fx.Node, tuple[str, tuple[int | None, ...]]] = {}  # -> (parameter, its dim per dim)
        self.group_norms: list[tuple[str, list[int], int]] = []
        self.activations: list[tuple[str, Ids]] = []  # (fx node name, ids of its output) of every activation call
        self.unknown: list[tuple[str, list[int]]] = []
        self.named_tensors = {name for name, _ in [*root.named_parameters(), *root.named_buffers()]}
        with _eval_mode(module):
            self.run(example_input)
        self.groups, self.keys = self._find_groups()
        self._refuse_unknown()

    # --- propagation -------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        self.ids[n] = self._propagate(n, out)
        self._follow_parameter(n, out)
        return out

    def _propagate(self, n: fx.Node, out: Any) -> Any:
        if n.op == "output":
            for a in n.all_input_nodes:
                for ids in self._lists(a):
                    self.uf.fix(ids)
            return None
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        ids = None
        if module is not None:
            rule = next((r for types, r in _MODULE_RULES if isinstance(module, types)), None)
            x = self._input(n)
            if rule is not None and x is not None and _torch_forward(module) and self._tensors_in(n) == [n.args[0]]:
                ids = getattr(self, rule)(n, module, out, *x)
        elif n.op in ("call_function", "call_method") and n.target in _FUNCTION_RULES:
            ids = getattr(self, _FUNCTION_RULES[n.target])(n, out)
        return ids if ids is not None else self._opaque(n, module, out)

    def _opaque(self, n: fx.Node, module: nn.Module | None, out: Any) -> Any:
        """An op of unknown channel semantics: remember what reaches it; its output has no removable channels."""
        touched = [i for a in n.all_input_nodes for ids in self._lists(a) for i in ids]
        if touched and not _is_shape_query(n, out):
            self.unknown.append((_where(n, module), touched))
        return _none_like(out)

    def _lists(self, a: fx.Node) -> list[list[int]]:
        """Every channel id list that node ``a``'s output carries."""
        ids = self.ids.get(a)
        return [lst for t in (ids if isinstance(ids, list) else [ids]) if isinstance(t, tuple)
                for lst in t if lst is not None]

    def _input(self, n: fx.Node) -> tuple[Ids, tuple[int, ...]] | None:
        """The ids and shape of ``n``'s first argument, if it is a tensor."""
        x = n.args[0] if n.args else None
        if isinstance(x, fx.Node) and x in self.shapes:
            return self.ids[x], self.shapes[x]
        return None

    def _tensors_in(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if a in self.shapes]

    def _arg(self, n: fx.Node, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (or keyword ``name``) of ``n``, evaluated."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return args[i] if len(args) > i else kwargs.get(name, default)

    @staticmethod
    def _raw(n: fx.Node, i: int, name: str) -> Any:
        """Argument ``i`` (or keyword ``name``) of ``n`` as traced: a literal, or a node computing it."""
        return n.args[i] if len(n.args) > i else n.kwargs.get(name)

    def _mix(self, ids: Ids, dims: Sequence[int] | range) -> Ids:
        """An op mixes the values along ``dims`` (a pooling, a norm's statistics): their channels are fixed."""
        for d in dims:
            self.uf.fix(ids[d])
        return tuple(None if d in dims else lst for d, lst in enumerate(ids))

    def _tie(self, operands: Sequence[fx.Node], shape: Sequence[int], d: int) -> Dim:
        """Unite the ids that ``operands`` lay along dim ``d`` of a result of ``shape`` (broadcast operands do
        not count). An operand without ids there fixes them, unless it is a custom parameter: then it is sliced."""
        lists, fixed, parameters = [], False, []
        for a in operands:
            s, ids = self.shapes[a], self.ids[a]
            e = d - (len(shape) - len(s))
            if e < 0 or s[e] != shape[d]:
                continue
            if ids[e] is not None:
                lists.append(ids[e])
            elif a in self.origins and self.origins[a][1][e] is not None:
                parameters.append((a, e))
            else:
                fixed = True
        if not lists:
            return None
        for other in lists[1:]:
            self.uf.union(lists[0], other)
        if fixed:
            self.uf.fix(lists[0])
        for a, e in parameters:
            self._slice_parameter(a, e, lists[0])
        return lists[0]

    def _slice_parameter(self, a: fx.Node, e: int, ids: list[int]) -> None:
        """Parameter ``a`` spans channels ``ids`` along its dim ``e``: sliced with them if a custom module owns it."""
        name, dims = self.origins[a]
        owner = self.root.get_submodule(name.rpartition(".")[0])
        if owner.__module__.startswith("torch.nn"):  # a standard layer's own weight, used by hand: keep it whole
            self.uf.fix(ids)
            return
        known = self.tensors.setdefault(name, {})
        if dims[e] in known:
            self.uf.union(known[dims[e]], ids)
        else:
            known[dims[e]] = ids

    def _follow_parameter(self, n: fx.Node, out: Any) -> None:
        """Remember which dims of ``out`` are which dims of a parameter (through views and elementwise ops)."""
        if not isinstance(out, torch.Tensor):
            return
        if n.op == "get_attr":
            if n.target in self.named_tensors:
                self.origins[n] = (n.target, tuple(range(out.dim())))
            return
        tensors = self._tensors_in(n)
        if len(tensors) != 1 or tensors[0] not in self.origins or n.target not in _PARAMETER_PATH:
            return
        name, dims = self.origins[tensors[0]]
        src = [(d, s) for d, s in enumerate(self.shapes[tensors[0]]) if s != 1]
        dst = [d for d, s in enumerate(out.shape) if s != 1]
        if [s for _, s in src] != [out.shape[d] for d in dst]:
            return
        mapped: list[int | None] = [None] * out.dim()
        for (a, _), b in zip(src, dst):
            mapped[b] = dims[a]
        self.origins[n] = (name, tuple(mapped))

    # --- function rules: (node, output) -> ids, or None when not understood ----------------
    def _elementwise(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor) or tuple(out.shape) != x[1]:
            return None
        if n.target in _DTYPE_ONLY or self._tensors_in(n) == [n.args[0]]:
            if n.target in _ACT_FUNCTIONS:
                self.activations.append((n.name, x[0]))
            return x[0]
        return None

    def _binary(self, n: fx.Node, out: Any) -> Ids | None:
        if not isinstance(out, torch.Tensor):
            return None
        operands = self._tensors_in(n)
        return tuple(self._tie(operands, out.shape, d) for d in range(out.dim()))

    def _cat(self, n: fx.Node, out: Any) -> Ids | None:
        parts = n.args[0]
        if not isinstance(out, torch.Tensor) or not all(isinstance(p, fx.Node) and p in self.shapes for p in parts):
            return None
        d = self._arg(n, 1, "dim", 0) % out.dim()
        ids = [None if j == d else self._tie(parts, out.shape, j) for j in range(out.dim())]
        if any(self.ids[p][d] is not None for p in parts):
            ids[d] = [i for p in parts for i in (self.ids[p][d] or [0] * self.shapes[p][d])]
        return tuple(ids)

    def _stack(self, n: fx.Node, out: Any) -> Ids | None:
        parts = n.args[0]
        if not isinstance(out, torch.Tensor) or not all(isinstance(p, fx.Node) and p in self.shapes for p in parts):
            return None
        d = self._arg(n, 1, "dim", 0) % out.dim()
        ids = [self._tie(parts, self.shapes[parts[0]], j) for j in range(out.dim() - 1)]
        return tuple(ids[:d]) + (None,) + tuple(ids[d:])

    def _softmax(self, n: fx.Node, out: Any) -> Ids | None:
        x, dim = self._input(n), self._arg(n, 1, "dim")
        return None if x is None or dim is None else self._mix(x[0], [dim % len(x[1])])

    def _reduce(self, n: fx.Node, out: Any) -> Any:
        x, dims = self._input(n), self._arg(n, 1, "dim")
        if x is None:
            return None
        if isinstance(dims, torch.Tensor):  # torch.max(a, b)
            return self._binary(n, out)
        xi, xs = x
        first = out if isinstance(out, torch.Tensor) else out[0]
        reduced = range(len(xs)) if dims is None else \
            {d % len(xs) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        mixed = self._mix(xi, reduced)
        ids = tuple(lst for d, lst in enumerate(mixed) if first.dim() == len(xs) or d not in reduced)
        return ids if isinstance(out, torch.Tensor) else [ids, ids]

    def _pool_function(self, n: fx.Node, out: Any) -> Any:
        x = self._input(n)
        return None if x is None else self._pooled(x[0], _POOL_FUNCTIONS[n.target], out)

    def _pooled(self, xi: Ids, k: int, out: Any) -> Any:
        ids = self._mix(xi, range(len(xi) - k, len(xi)))
        return ids if isinstance(out, torch.Tensor) else [ids, ids]  # with return_indices

    def _interpolate(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        return None if x is None else self._mix(x[0], range(2, len(x[1])))

    def _pad_function(self, n: fx.Node, out: Any) -> Ids | None:
        x, raw = self._input(n), self._raw(n, 1, "pad")
        if x is None:
            return None
        computed = isinstance(raw, fx.Node) or any(isinstance(p, fx.Node) for p in raw)
        return self._pad(x[0], self._arg(n, 1, "pad"), self._arg(n, 2, "mode", "constant"), computed)

    def _pad(self, xi: Ids, pad: Sequence[int], mode: str, computed: bool) -> Ids:
        """Constant padding along a channel dim adds fixed channels (a negative pad crops: the cut channels
        are fixed); other modes, or pads computed at run time, fix the channels of that dim."""
        ids = list(xi)
        for i in range(len(pad) // 2):
            d = len(xi) - 1 - i
            lst, lo, hi = xi[d], pad[2 * i], pad[2 * i + 1]
            if lst is None:
                continue
            if mode != "constant" or computed:
                self.uf.fix(lst)
                ids[d] = None
                continue
            start, stop = max(-lo, 0), len(lst) - max(-hi, 0)
            self.uf.fix(lst[:start] + lst[stop:])
            ids[d] = [0] * max(lo, 0) + lst[start:stop] + [0] * max(hi, 0)
        return tuple(ids)

    def _reshape_function(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor):
            return None
        literal: set[int] = set()
        if n.target in ("view", "reshape", torch.reshape):
            literal = _literal_sizes(n.args[1:] or (n.kwargs.get("shape", n.kwargs.get("size", ())),))
        elif n.target in ("unflatten", torch.unflatten):
            dim = self._arg(n, 1, "dim") % len(x[1])
            literal = {dim + k for k in _literal_sizes((self._raw(n, 2, "sizes"),))}
        return self._reshape(x[0], x[1], tuple(out.shape), literal)

    def _reshape(self, xi: Ids, xs: tuple[int, ...], os: tuple[int, ...], literal: set[int]) -> Ids:
        """Ids after a reshape from ``xs`` to ``os`` (``literal``: output dims whose size is a literal).

        The channels of a run of dims must end up along one output dim whose size is computed at run time
        (a literal size cannot follow a removal), else they are fixed. A channel dim split into a literal and
        a computed part (``view(N, g, C // g, H, W)``) ties the channels that differ only in the literal part.
        """
        ids: list[Dim] = [None] * len(os)
        for ins, outs in _segments(xs, os):
            carriers = [d for d in ins if xi[d] is not None]
            if not carriers:
                continue
            if len(ins) == len(outs) == 1 and outs[0] not in literal:
                ids[outs[0]] = xi[ins[0]]
                continue
            line = self._regroup(xi, xs, ins, [os[k] for k in outs], [j for j, k in enumerate(outs) if k in literal]) \
                if len(carriers) == 1 else None
            if line is None:
                for d in carriers:
                    self.uf.fix(xi[d])
            else:
                ids[outs[line[0]]] = line[1]
        return tuple(ids)

    def _regroup(self, xi: Ids, xs: tuple[int, ...], ins: range, sizes: list[int],
                 literal: list[int]) -> tuple[int, list[int]] | None:
        """Lay the one id-carrying input dim of ``ins`` out over output dims ``sizes``; the (dim, ids) of the
        only output dim along which the ids vary, or None."""
        (d,) = [k for k in ins if xi[k] is not None]
        t = torch.tensor(xi[d]).view([xs[k] if k == d else 1 for k in ins])
        t = t.expand([xs[k] for k in ins]).reshape(sizes)
        for j in literal:
            if t.shape[j] > 1:
                pairs = torch.stack([t.narrow(j, 0, 1).expand_as(t).flatten(), t.flatten()], 1).unique(dim=0)
                for a, b in pairs.tolist():
                    self.uf.union([a], [b])
                t = t.narrow(j, 0, 1)
        t = self.uf.roots(t)
        varying = [j for j in range(t.dim()) if not bool((t == t.narrow(j, 0, 1)).all())]
        if len(varying) != 1:
            return None
        j = varying[0]
        return j, t.movedim(j, 0).reshape(t.shape[j], -1)[:, 0].tolist()

    def _expand(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor):
            return None
        (xi, xs), pad = x, out.dim() - len(x[1])
        literal = _literal_sizes(n.args[1:]) if n.target == "expand" else set()
        ids: list[Dim] = [None] * pad
        for d, lst in enumerate(xi):
            if lst is not None and (xs[d] != out.shape[d + pad] or d + pad in literal):
                self.uf.fix(lst)
                lst = None
            ids.append(lst)
        return tuple(ids)

    def _permute(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        target = getattr(torch.Tensor, n.target) if isinstance(n.target, str) else n.target
        return self._permuted(x[0], lambda probe: target(probe, *args[1:], **kwargs))

    @staticmethod
    def _permuted(xi: Ids, op: Any) -> Ids:
        """Ids after ``op``, a permutation of dims: read off by applying it to a meta tensor of sizes 2, 3, ..."""
        moved = op(torch.empty(tuple(range(2, 2 + len(xi))), device="meta"))
        return tuple(xi[s - 2] for s in moved.shape)

    def _attribute(self, n: fx.Node, out: Any) -> Ids | None:
        source = self.ids.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        if isinstance(source, list) and n.args[1] in ("values", "indices"):  # of max/min over a dim
            return source[0]
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor) or n.args[1] not in _TRANSPOSE_ATTRIBUTES:
            return None
        return self._permuted(x[0], lambda probe: getattr(probe, n.args[1]))

    def _getitem(self, n: fx.Node, out: Any) -> Any:
        source = self.ids.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        index = self._arg(n, 1, "index")
        if isinstance(source, list):  # an element of a tuple output (chunk, split, max)
            return source[index] if isinstance(index, int) else None
        x = self._input(n)
        if x is None or not isinstance(out, torch.Tensor):
            return None
        raw = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        values = index if isinstance(index, tuple) else (index,)
        if any(isinstance(v, (torch.Tensor, list, bool)) for v in values):
            return None  # advanced indexing
        return self._index(x[0], x[1], raw, values)

    def _index(self, xi: Ids, xs: tuple[int, ...], raw: tuple, values: tuple) -> Ids:
        """Ids after ``x[values]`` (ints, slices, None, Ellipsis). A literal bound counted from the front fixes
        the channels before it (from the back: after it), so that the same bound picks the same channels
        after a removal; a bound computed at run time, or a step, fixes the whole dim."""
        consumed = sum(v is not None and v is not Ellipsis for v in values)
        items: list[tuple[Any, Any]] = []
        for r, v in zip(raw, values):
            items += [(slice(None), slice(None))] * (len(xs) - consumed) if v is Ellipsis else [(r, v)]
        items += [(slice(None), slice(None))] * (len(xs) - sum(v is not None for _, v in items))
        ids, d = [], 0
        for r, v in items:
            if v is None:
                ids.append(None)
                continue
            lst, size = xi[d], xs[d]
            d += 1
            if lst is None or v == slice(None):
                if isinstance(v, slice):
                    ids.append(lst)
                continue
            computed = isinstance(r, fx.Node) or isinstance(r, slice) and any(
                isinstance(b, fx.Node) for b in (r.start, r.stop, r.step))
            if computed or isinstance(v, slice) and v.step not in (None, 1):
                self.uf.fix(lst)
                if isinstance(v, slice):
                    ids.append(None)
                continue
            bounds = (v.start, v.stop) if isinstance(v, slice) else (v, v + 1 if v != -1 else None)
            for b in bounds:
                if b is not None:
                    self.uf.fix(lst[:b] if b >= 0 else lst[max(size + b, 0):])
            if isinstance(v, slice):
                ids.append(lst[v])
        return tuple(ids)

    def _narrow(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None:
            return None
        dim, start, length = (self._arg(n, i, name) for i, name in ((1, "dim"), (2, "start"), (3, "length")))
        raw = (self._raw(n, 2, "start"), self._raw(n, 3, "length"))
        start %= x[1][dim]
        return self._index(x[0], x[1], (slice(None),) * (dim % len(x[1])) + (slice(*raw),),
                           (slice(None),) * (dim % len(x[1])) + (slice(start, start + length),))

    def _chunk(self, n: fx.Node, out: Any) -> list | None:
        x = self._input(n)
        if x is None or not isinstance(out, (tuple, list)):
            return None
        chunks, d = self._arg(n, 1, "chunks"), self._arg(n, 2, "dim", 0) % len(x[1])
        return self._parts(x[0], d, len(out), equal=x[1][d] % chunks == 0 and len(out) == chunks)

    def _split(self, n: fx.Node, out: Any) -> list | None:
        x = self._input(n)
        if x is None or not isinstance(out, (tuple, list)):
            return None
        size, d = self._arg(n, 1, "split_size"), self._arg(n, 2, "dim", 0) % len(x[1])
        size = self._arg(n, 1, "split_size_or_sections") if size is None else size
        computed = isinstance(self._raw(n, 1, "split_size") or self._raw(n, 1, "split_size_or_sections"), fx.Node)
        return self._parts(x[0], d, len(out), equal=computed and isinstance(size, int) and x[1][d] % size == 0)

    def _parts(self, xi: Ids, d: int, count: int, *, equal: bool) -> list[Ids]:
        """Ids of the parts of a split along dim ``d``. Equal parts whose size is computed at run time (chunk)
        stay right after a removal only if every part loses the same positions: the positions are tied.
        Parts of literal sizes fix the channels."""
        lst = xi[d]
        if lst is None or not equal:
            self.uf.fix(lst)
            return [xi[:d] + (None,) + xi[d + 1:]] * count
        size = len(lst) // count
        parts = [lst[j * size:(j + 1) * size] for j in range(count)]
        for part in parts[1:]:
            self.uf.union(parts[0], part)
        return [xi[:d] + (part,) + xi[d + 1:] for part in parts]

    def _unbind(self, n: fx.Node, out: Any) -> list | None:
        x = self._input(n)
        if x is None or not isinstance(out, (tuple, list)):
            return None
        d = self._arg(n, 1, "dim", 0) % len(x[1])
        self.uf.fix(x[0][d])
        return [x[0][:d] + x[0][d + 1:]] * len(out)

    def _shuffle_function(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        return None if x is None else self._shuffle(x[0], self._arg(n, 1, "groups"))

    def _shuffle(self, xi: Ids, groups: int) -> Ids:
        """Channel shuffle (the view/transpose/view of ShuffleNet): channel ``j`` of every group is tied."""
        lst = xi[1]
        if lst is None:
            return xi
        if len(lst) % groups:
            self.uf.fix(lst)
            return xi[:1] + (None,) + xi[2:]
        per = len(lst) // groups
        for g in range(1, groups):
            self.uf.union(lst[:per], lst[g * per:(g + 1) * per])
        return xi[:1] + ([lst[j] for j in range(per) for _ in range(groups)],) + xi[2:]

    def _layer_norm_function(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None:
            return None
        k = len(self._arg(n, 1, "normalized_shape"))
        return self._mix(x[0], range(len(x[1]) - k, len(x[1])))

    def _norm_function(self, n: fx.Node, out: Any) -> Ids | None:
        """A functional norm whose per-channel parameters the surgery does not slice: its channels are fixed."""
        x = self._input(n)
        return None if x is None else self._mix(x[0], range(1, len(x[1])))

    def _prelu_function(self, n: fx.Node, out: Any) -> Ids | None:
        x = self._input(n)
        if x is None:
            return None
        return x[0] if self._arg(n, 1, "weight").numel() == 1 else self._mix(x[0], [1])

    # --- module rules: (node, module, output, input ids, input shape) -> ids, or None ---------
    def _layer(self, n: fx.Node, in_ids: list[int], out: int | str | None, dim: int) -> _Layer:
        """The record of layer ``n.target`` (``out``: its number of output channels, "same" for a depthwise
        conv, None for a per-channel layer); a layer called again ties the inputs of all its calls."""
        layer = self.layers.get(n.target)
        if layer is not None:
            self.uf.union(layer.in_ids, in_ids)
            return layer
        out_ids = in_ids if out == "same" else None if out is None else self.uf.new(out)
        return self.layers.setdefault(n.target, _Layer(in_ids, out_ids, dim))

    def _conv(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        d = len(xs) - len(m.kernel_size) - 1
        kind = _weight_kind(m)
        if d < 0 or kind is None:
            return None
        ids = self._mix(xi, range(d + 1, len(xs)))
        depthwise = m.groups == m.in_channels == m.out_channels > 1
        if m.groups > 1 and not depthwise:  # other grouped convs keep all their channels
            self.uf.fix(xi[d])
            return ids[:d] + (None,) + ids[d + 1:]
        layer = self._layer(n, xi[d] or [0] * xs[d], "same" if depthwise else m.out_channels, d)
        if kind == "spectral_norm":  # removing inputs would change sigma
            self.uf.fix(layer.in_ids)
        return ids[:d] + (layer.out_ids,) + ids[d + 1:]

    def _linear(self, n: fx.Node, m: nn.Linear, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        kind = _weight_kind(m)
        if kind is None:
            return None
        layer = self._layer(n, xi[-1] or [0] * xs[-1], m.out_features, len(xs) - 1)
        if kind == "spectral_norm":
            self.uf.fix(layer.in_ids)
        return xi[:-1] + (layer.out_ids,)

    def _per_channel(self, n: fx.Node, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        """A layer with one parameter entry per channel of dim 1 (BatchNorm, per-channel PReLU)."""
        if len(xs) < 2:
            return None
        layer = self._layer(n, xi[1] or [0] * xs[1], None, 1)
        return xi[:1] + (layer.in_ids,) + xi[2:]

    def _batchnorm(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        return self._per_channel(n, xi, xs)

    def _prelu(self, n: fx.Node, m: nn.PReLU, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        return xi if m.num_parameters == 1 else self._per_channel(n, xi, xs)

    def _groupnorm(self, n: fx.Node, m: nn.GroupNorm, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        ids = self._per_channel(n, self._mix(xi, range(2, len(xs))), xs)
        if ids is not None and m.num_groups == 1:
            self.uf.fix(ids[1])
        elif ids is not None:
            self.group_norms.append((n.target, ids[1], m.num_groups))
        return ids

    def _layernorm(self, n: fx.Node, m: nn.LayerNorm, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return self._mix(xi, range(len(xs) - len(m.normalized_shape), len(xs)))

    def _activation(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        self.activations.append((n.name, xi))
        return xi

    def _same(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return xi

    def _pool(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Any:
        return self._pooled(xi, next(k for k, types in _POOLS.items() if isinstance(m, types)), out)

    def _upsample(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return self._mix(xi, range(2, len(xs)))

    def _pad_module(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return self._pad(xi, m.padding, "constant" if isinstance(m, _ConstantPadNd) else "other", False)

    def _flatten(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return self._reshape(xi, xs, tuple(out.shape), set())

    def _unflatten(self, n: fx.Node, m: nn.Unflatten, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        dim = m.dim % len(xs)
        return self._reshape(xi, xs, tuple(out.shape), {dim + k for k in _literal_sizes((m.unflattened_size,))})

    def _softmax_module(self, n: fx.Node, m: nn.Module, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids | None:
        return None if m.dim is None else self._mix(xi, [m.dim % len(xs)])

    def _shuffle_module(self, n: fx.Node, m: nn.ChannelShuffle, out: Any, xi: Ids, xs: tuple[int, ...]) -> Ids:
        return self._shuffle(xi, m.groups)

    # --- results -----------------------------------------------------------------
    def roots(self, ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(self.uf.find(i) for i in ids)

    def _producer_keys(self) -> dict[tuple[int, ...], list[str]]:
        """The roots of each group's channels (its key) and its producers in execution order; keys with a
        fixed or repeated channel, or sharing a channel with another key, are left out."""
        by_key: dict[tuple[int, ...], list[str]] = {}
        for name, layer in self.layers.items():
            if layer.out_ids is not None:
                by_key.setdefault(self.roots(layer.out_ids), []).append(name)
        owner: dict[int, tuple[int, ...]] = {}
        bad: set[tuple[int, ...]] = set()
        for key in by_key:
            if 0 in key or len(set(key)) != len(key):
                bad.add(key)
            for r in set(key):
                if owner.setdefault(r, key) != key:
                    bad |= {key, owner[r]}
        return {key: names for key, names in by_key.items() if key not in bad}

    @staticmethod
    def _positions(by_key: Mapping[tuple[int, ...], Any]) -> dict[int, tuple[tuple[int, ...], int]]:
        """Root id -> (the key of the group holding it, its channel in the group)."""
        return {r: (key, j) for key in by_key for j, r in enumerate(key)}

    def _group_norm_blocks(self, by_key: Mapping[tuple[int, ...], list[str]]) -> dict[tuple[int, ...], int] | None:
        """The block size of each group that reaches a GroupNorm, or None after fixing the groups whose
        channels do not fall into its groups as whole aligned blocks of one channel group."""
        position = self._positions(by_key)
        blocks: dict[tuple[int, ...], int] = {}
        bad: set[tuple[int, ...]] = set()
        for _, ids, num_groups in self.group_norms:
            size = len(ids) // num_groups
            for c in range(num_groups):
                hits = [position.get(r) for r in self.roots(ids[c * size:(c + 1) * size])]
                keys = {h[0] for h in hits if h is not None}
                js = sorted(h[1] for h in hits if h is not None)
                if not keys:
                    continue
                key = next(iter(keys))
                if len(keys) > 1 or js != list(range(js[0], js[0] + size)) or js[0] % size \
                        or blocks.setdefault(key, size) != size:
                    bad |= keys
        for key in bad:
            self.uf.fix(list(key))
        return None if bad else blocks

    def _sites(self, by_key: Mapping[tuple[int, ...], list[str]]) -> dict[tuple[int, ...], list[ActivationSite]]:
        """Per group key, the activation calls some of its channels pass through, on any dim."""
        position = self._positions(by_key)
        sites: dict[tuple[int, ...], list[ActivationSite]] = {key: [] for key in by_key}
        for node, ids in self.activations:
            for d, lst in enumerate(ids):
                entries: dict[tuple[int, ...], list[int]] = {}
                for i, r in enumerate(self.roots(lst or ())):
                    if r in position:
                        key, j = position[r]
                        entries.setdefault(key, [-1] * len(lst))[i] = j
                for key, channels in entries.items():
                    sites[key].append(ActivationSite(node, tuple(channels), d))
        return sites

    def _norms(self, kind: type[nn.Module]) -> list[tuple[str, tuple[int, ...]]]:
        """The per-channel layers of type ``kind`` and the roots of the channels they see."""
        return [(name, self.roots(layer.in_ids)) for name, layer in self.layers.items()
                if layer.out_ids is None and isinstance(self.root.get_submodule(name), kind)]

    def _find_groups(self) -> tuple[list[ChannelGroup], dict[str, tuple[int, ...]]]:
        blocks = None
        while blocks is None:
            by_key = self._producer_keys()
            blocks = self._group_norm_blocks(by_key)
        batchnorms, groupnorms, sites = self._norms(_BatchNorm), self._norms(nn.GroupNorm), self._sites(by_key)
        groups, keys = [], {}
        for key, names in by_key.items():
            keys[names[0]] = key
            groups.append(ChannelGroup(
                name=names[0], producers=tuple(names), size=len(key), sites=tuple(sites[key]),
                batchnorms=tuple(b for b, k in batchnorms if k == key), granularity=blocks.get(key, 1),
                channel_dim=self.layers[names[0]].dim, groupnorms=tuple(b for b, k in groupnorms if k == key)))
        return groups, keys

    def _refuse_unknown(self) -> None:
        owner = {r: name for name, key in self.keys.items() for r in key}
        for where, ids in self.unknown:
            hit = sorted({owner[r] for r in self.roots(ids) if r in owner})
            if hit:
                raise UsageError(f"surgery: {where} is not supported, and channels of group(s) "
                                 f"{', '.join(hit)} flow into it; it cannot be resized safely")

    def reduced_shape(self, n: fx.Node, removed: Mapping[int, float], cache: dict[int, int]) -> tuple[int, ...] | None:
        """The shape node ``n`` must have once channels ``removed`` are gone (None: not a tensor)."""
        ids, shape = self.ids.get(n), self.shapes.get(n)
        if not isinstance(ids, tuple) or shape is None:
            return None
        for lst in ids:
            if lst is not None and id(lst) not in cache:
                cache[id(lst)] = sum(r not in removed for r in self.roots(lst))
        return tuple(s if lst is None else cache[id(lst)] for s, lst in zip(shape, ids))


_FUNCTION_RULES: dict[Any, str] = {
    **dict.fromkeys(_ELEMENTWISE, "_elementwise"), **dict.fromkeys(_BINARY, "_binary"),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), "_cat"), torch.stack: "_stack",
    **dict.fromkeys(_SOFTMAX, "_softmax"), **dict.fromkeys(_REDUCE, "_reduce"),
    **dict.fromkeys(_POOL_FUNCTIONS, "_pool_function"),
    **dict.fromkeys((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), "_interpolate"),
    F.pad: "_pad_function", **dict.fromkeys(_RESHAPE, "_reshape_function"),
    **dict.fromkeys(("expand", "expand_as"), "_expand"), **dict.fromkeys(_PERMUTE, "_permute"),
    getattr: "_attribute", operator.getitem: "_getitem", **dict.fromkeys((torch.narrow, "narrow"), "_narrow"),
    **dict.fromkeys((torch.chunk, "chunk"), "_chunk"), **dict.fromkeys((torch.split, "split"), "_split"),
    **dict.fromkeys((torch.unbind, "unbind"), "_unbind"),
    **dict.fromkeys((F.channel_shuffle, torch.channel_shuffle, F.native_channel_shuffle), "_shuffle_function"),
    F.layer_norm: "_layer_norm_function", F.prelu: "_prelu_function",
    **dict.fromkeys((F.group_norm, F.batch_norm, F.instance_norm, F.local_response_norm), "_norm_function"),
}
_MODULE_RULES: tuple[tuple[Any, str], ...] = (
    (_CONVS, "_conv"), (nn.Linear, "_linear"), (_BatchNorm, "_batchnorm"), (nn.GroupNorm, "_groupnorm"),
    (nn.LayerNorm, "_layernorm"), (nn.PReLU, "_prelu"), (_ACTIVATIONS, "_activation"), (_PASS_MODULES, "_same"),
    (tuple(t for types in _POOLS.values() for t in types), "_pool"), (nn.Upsample, "_upsample"),
    (_PADS, "_pad_module"), (nn.Flatten, "_flatten"), (nn.Unflatten, "_unflatten"),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), "_softmax_module"), (nn.ChannelShuffle, "_shuffle_module"),
)


def channel_groups(model: nn.Module, *, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The removable channel groups of ``model``, in execution order.

    ``example_input`` is a small batch of the model's input (its values do not
    matter; batch statistics and weights are left untouched). The network's
    output channels are never in a group.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> model = create_model("resnet20", in_shape=(3, 32, 32), num_classes=10)
    >>> groups = channel_groups(model, example_input=torch.randn(1, 3, 32, 32))
    >>> groups[0].producers
    ('conv1', 'layer1.0.conv2', 'layer1.1.conv2', 'layer1.2.conv2')
    >>> groups[0].activations  # the stem's ReLU and the ReLU after each residual sum of the stage
    ('relu', 'layer1_0_relu2', 'layer1_1_relu2', 'layer1_2_relu2')
    >>> groups[1].name, groups[1].batchnorms, groups[1].activations
    ('layer1.0.conv1', ('layer1.0.bn1',), ('layer1_0_relu1',))
    """
    return _analyse(model, example_input).groups


def _kept_indices(name: str, idx: Sequence[int] | torch.Tensor, size: int, *, unit: str = "channel",
                  granularity: int = 1) -> set[int]:
    """The indices ``idx`` to keep of ``size`` units of ``name``, checked: not empty, in range, whole blocks of
    ``granularity`` (a group that reaches a GroupNorm)."""
    if isinstance(idx, torch.Tensor) and (idx.dtype == torch.bool or idx.is_floating_point()):
        raise UsageError(f"keep[{name!r}]: expected {unit} indices, got a {idx.dtype} tensor")
    kept = {int(i) for i in (idx.flatten().tolist() if isinstance(idx, torch.Tensor) else idx)}
    if not kept:
        raise UsageError(f"keep[{name!r}]: removing all {size} {unit}s of a group is not allowed")
    if min(kept) < 0 or max(kept) >= size:
        raise UsageError(f"keep[{name!r}]: indices must lie in [0, {size}), got {min(kept)}..{max(kept)}")
    g = granularity
    split = next((b for b in range(0, size, g) if 0 < len(kept & set(range(b, b + g))) < g), None)
    if split is not None:
        raise UsageError(f"keep[{name!r}]: the group reaches a GroupNorm, so its channels go in whole blocks of "
                         f"{g} (j // {g}); channels {split}..{split + g - 1} are split")
    return kept


def _take(t: torch.Tensor, dim: int, keep: list[int] | None) -> torch.Tensor:
    t = t.detach()
    return t if keep is None else t.index_select(dim, torch.tensor(keep, device=t.device))


def _set_param(m: nn.Module, attr: str, value: torch.Tensor | None) -> None:
    """Replace a parameter (a new one is trainable, a replaced one keeps its flag), a buffer or a tensor of ``m``."""
    if attr in m._buffers:
        m._buffers[attr] = value
    elif attr in m._parameters:
        old = m._parameters[attr]
        setattr(m, attr, None if value is None else
                nn.Parameter(value, requires_grad=old is None or old.requires_grad))
    else:
        setattr(m, attr, value)


def _select(m: nn.Module, attr: str, dim: int, keep: list[int] | None) -> None:
    t = getattr(m, attr, None)
    if t is not None and keep is not None:
        _set_param(m, attr, _take(t, dim, keep))


def _slice_weight_norm(owner: nn.Module, g_attr: str, v_attr: str, out_keep: list[int] | None,
                       in_keep: list[int] | None) -> None:
    """``w = g * v / ||v||`` per output channel: slice ``g`` and ``v``, rescaling ``g`` so that the kept
    entries of ``w`` do not change when input columns leave the norm."""
    g, v = _take(getattr(owner, g_attr), 0, out_keep), _take(getattr(owner, v_attr), 0, out_keep)
    if in_keep is not None:
        kept = _take(v, 1, in_keep)
        g = g * torch.norm_except_dim(kept, 2, 0) / torch.norm_except_dim(v, 2, 0)
        v = kept
    _set_param(owner, g_attr, g)
    _set_param(owner, v_attr, v)


def _slice_spectral_norm(owner: nn.Module, w_attr: str, norm: nn.Module, u_attr: str, v_attr: str,
                         out_keep: list[int] | None, in_keep: list[int] | None) -> None:
    """``w = W / (u^T W v)``: slice ``W`` and the power iteration's ``u`` (outputs) and ``v`` (inputs)."""
    w = getattr(owner, w_attr)
    v = getattr(norm, v_attr)
    _set_param(norm, u_attr, _take(getattr(norm, u_attr), 0, out_keep))
    _set_param(norm, v_attr, _take(v.view(w.shape[1], -1), 0, in_keep).flatten())
    _set_param(owner, w_attr, _take(_take(w, 0, out_keep), 1, in_keep))


def _slice_weight(m: nn.Module, out_keep: list[int] | None, in_keep: list[int] | None) -> None:
    """Keep output channels ``out_keep`` (dim 0) and inputs ``in_keep`` (dim 1) of ``m``'s weight, also under
    weight_norm/spectral_norm (old hooks or parametrizations), whose own tensors are sliced."""
    kind = _weight_kind(m)
    if kind == "plain":
        _select(m, "weight", 0, out_keep)
        _select(m, "weight", 1, in_keep)
    elif parametrize.is_parametrized(m):
        plist = m.parametrizations.weight
        if kind == "weight_norm":
            _slice_weight_norm(plist, "original0", "original1", out_keep, in_keep)
        else:
            _slice_spectral_norm(plist, "original", plist[0], "_u", "_v", out_keep, in_keep)
    else:
        hook = next(h for h in m._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm)))
        if kind == "weight_norm":
            _slice_weight_norm(m, "weight_g", "weight_v", out_keep, in_keep)
            m.weight = hook.compute_weight(m)
        else:
            _slice_spectral_norm(m, "weight_orig", m, "weight_u", "weight_v", out_keep, in_keep)
            m.weight = hook.compute_weight(m, do_power_iteration=False)


def scales_exactly(m: nn.Module) -> bool:
    """Whether :func:`scale_output_channels` can scale the outputs of ``m``."""
    return getattr(m, "weight", None) is not None and _weight_kind(m) in ("plain", "weight_norm")


@torch.no_grad()
def scale_output_channels(m: nn.Module, factor: torch.Tensor, *, bias: bool = True) -> None:
    """Multiply output channel ``j`` of ``m`` by ``factor[j]`` (a single value: every channel) in its parameters.

    ``m`` is a convolution or Linear (its weight's rows), or a norm layer's
    affine (BatchNorm, GroupNorm, LayerNorm); under ``weight_norm`` its ``g``
    is scaled, since the weight is computed from it. ``bias=False`` leaves the
    bias alone (a zeroed filter keeps its bias). Refused (UsageError) where no
    parameter scales the output linearly (:func:`scales_exactly`): under
    ``spectral_norm`` (sigma follows the weight), a norm without affine weight.

    >>> conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(1, 3, 1))
    >>> before = conv.weight.detach().clone()
    >>> scale_output_channels(conv, torch.tensor([1.0, 0.0, 2.0]))
    >>> torch.allclose(conv.weight, before * torch.tensor([1.0, 0.0, 2.0]).view(3, 1, 1, 1))
    True
    """
    if not scales_exactly(m):
        raise UsageError(f"surgery: the outputs of {type(m).__name__} cannot be scaled in its parameters "
                         f"({'no affine weight' if getattr(m, 'weight', None) is None else 'spectral_norm'})")
    kind = _weight_kind(m)
    owner, attr = (m, "weight") if kind == "plain" else (m.parametrizations.weight, "original0") \
        if parametrize.is_parametrized(m) else (m, "weight_g")
    t = getattr(owner, attr)
    t.mul_(factor.to(t).view(-1, *[1] * (t.dim() - 1)))
    if bias and m.bias is not None:
        m.bias.mul_(factor.to(m.bias))
    if kind == "weight_norm" and not parametrize.is_parametrized(m):
        m.weight = next(h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)).compute_weight(m)


def _resize(m: nn.Module, in_keep: list[int] | None, out_keep: list[int] | None) -> None:
    """Keep input channels ``in_keep`` and output channels ``out_keep`` of ``m`` (None keeps all).

    Per-channel layers (BatchNorm, GroupNorm, PReLU) and depthwise convs have one set of channels, ``in_keep``.
    """
    if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.PReLU)):
        if in_keep is not None:
            _resize_per_channel(m, in_keep)
        return
    if isinstance(m, _CONVS) and m.groups > 1:
        if not m.groups == m.in_channels == m.out_channels:
            raise UsageError(f"surgery: grouped conv {m} cannot be resized, only depthwise ones")
        _slice_weight(m, in_keep, None)
        _select(m, "bias", 0, in_keep)
        m.in_channels = m.out_channels = m.groups = m.weight.shape[0]
        return
    _slice_weight(m, out_keep, in_keep)
    _select(m, "bias", 0, out_keep)
    out_n, in_n = m.weight.shape[:2]
    if isinstance(m, _CONVS):
        m.out_channels, m.in_channels = out_n, in_n
    else:
        m.out_features, m.in_features = out_n, in_n


def _resize_per_channel(m: nn.Module, keep: list[int]) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if not (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            _select(m, attr, 0, keep)
    if isinstance(m, nn.GroupNorm):
        m.num_groups = len(keep) // (m.num_channels // m.num_groups)
        m.num_channels = len(keep)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    else:
        m.num_features = len(keep)


def _fold(m: nn.Module, constants: torch.Tensor) -> None:
    """Add to ``m``'s bias what input columns holding ``constants`` (0 elsewhere) contribute."""
    w = m.weight.detach()
    delta = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ constants.to(w)
    bias = delta if m.bias is None else m.bias.detach() + delta
    _set_param(m, "bias", bias)


class _ShapeMismatch(RemovalError):
    pass


class _ShapeCheck(_Probe):
    """Runs the reduced model and checks every tensor against the shape the analysis predicts."""

    def __init__(self, module: fx.GraphModule, analysis: _Analysis, removed: Mapping[int, float]) -> None:
        super().__init__(module)
        self.analysis, self.removed, self.cache = analysis, removed, {}

    def seen(self, n: fx.Node, out: Any) -> None:
        want = None if n in self.analysis.origins else self.analysis.reduced_shape(n, self.removed, self.cache)
        if want is not None and isinstance(out, torch.Tensor) and tuple(out.shape) != want:
            module = self.module.get_submodule(n.target) if n.op == "call_module" else None
            raise _ShapeMismatch(f"surgery: {_where(n, module)} gives shape {tuple(out.shape)} after the removal, "
                                 f"expected {want}; please report this model")


def _check_reduced(new: nn.Module, analysis: _Analysis, removed: Mapping[int, float], x: torch.Tensor) -> None:
    """Never hand back a model that does not run, or whose tensors did not shrink as the analysis says."""
    module = fx.GraphModule(new, analysis.module.graph)
    with _eval_mode(module):
        try:
            _ShapeCheck(module, analysis, removed).run(_on_device_of(new, x))
        except _ShapeMismatch:
            raise
        except RemovalError as e:
            raise RemovalError(f"surgery: the reduced model does not run: {e}; please report this model") from e


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, also when old-style weight_norm/spectral_norm hooks left a computed weight
    (a non-leaf tensor, which deepcopy refuses) on a module: that weight is copied detached."""
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and not t.is_leaf}
    return copy.deepcopy(model, memo)


def _is_consumer(layer: _Layer) -> bool:
    """A layer that mixes the channels it reads into new ones (a convolution or Linear, not depthwise)."""
    return layer.out_ids is not None and layer.out_ids is not layer.in_ids


@contextmanager
def _refused(what: str) -> Iterator[None]:
    """Any error but a UsageError while ``what`` is resized becomes one :class:`RemovalError` line naming it."""
    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        raise RemovalError(f"surgery: {what} cannot be resized: {_one_line(e)}") from e


def remove_channels(model: nn.Module, keep: Mapping[str, Sequence[int] | torch.Tensor], *,
                    example_input: torch.Tensor, fold_constants: Mapping[str, torch.Tensor] | None = None,
                    consumer_constants: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A smaller dense copy of ``model`` that keeps only the channels ``keep[group]`` of each group.

    Producers lose output channels, BatchNorm layers the matching entries, and
    every consumer the matching inputs (``H*W`` columns per channel for a Linear
    after a flatten, one column after global pooling); so do GroupNorm and PReLU
    layers and the per-channel parameters of custom modules. Groups missing from
    ``keep`` are unchanged; removing every channel of a group is refused, and so
    is splitting a block of a group with ``granularity`` > 1.
    ``model`` is not modified. A layer that cannot be sliced, or a result that
    does not run, is refused in one :class:`RemovalError` line naming the layer
    or op.

    A removed channel that is not zero but a constant at a consumer's input
    can be folded into the consumer's bias (a bias is created if missing):
    ``W[:, col] * c`` for a Linear, exact; the kernel sum times ``c`` for a
    convolution, exact without padding, while with zero padding the outputs
    within ``padding`` of the border receive the full kernel sum although part
    of their window is padding (measure the change, or keep such channels).
    ``consumer_constants[layer]`` (one value per input column of the consumer
    ``layer``, as :func:`constant_inputs` reads them) gives what that consumer
    sees; ``fold_constants[group]`` (length ``size``) gives one value per
    channel that every consumer sees (a zero filter followed by BatchNorm and
    ReLU gives ``relu(beta)`` at every consumer, unless something else lies
    between). Only the columns of removed channels are read.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10)
    >>> small = remove_channels(model, {"classifier.fc1": [0, 1, 2]}, example_input=torch.randn(1, 1, 8, 8))
    >>> small.classifier.fc1.out_features, small.classifier.fc2.in_features
    (3, 3)
    """
    new = copy_model(model)
    analysis = _analyse(new, example_input)
    removed = _removed_ids(analysis, keep, fold_constants or {})
    if not removed:
        return new
    at_consumer = _checked_consumer_constants(analysis, consumer_constants or {})

    def kept_of(ids: list[int]) -> list[int] | None:
        kept = [j for j, r in enumerate(analysis.roots(ids)) if r not in removed]
        return None if len(kept) == len(ids) else kept

    with torch.no_grad():
        for name, layer in analysis.layers.items():
            module = new.get_submodule(name)
            with _refused(f"layer '{name}' ({type(module).__name__})"):
                in_keep = kept_of(layer.in_ids)
                if in_keep is not None and _is_consumer(layer):
                    given = at_consumer.get(name)
                    column = torch.tensor([(float(given[j]) if given is not None else removed[r]) if r in removed
                                           else 0.0 for j, r in enumerate(analysis.roots(layer.in_ids))])
                    if column.any():
                        _fold(module, column)
                _resize(module, in_keep, None if layer.out_ids is None else kept_of(layer.out_ids))
        for name, dims in analysis.tensors.items():
            owner, _, attr = name.rpartition(".")
            with _refused(f"tensor '{name}'"):
                t = getattr(new.get_submodule(owner), attr)
                for dim, ids in dims.items():
                    t = _take(t, dim, kept_of(ids))
                _set_param(new.get_submodule(owner), attr, t)
    _check_reduced(new, analysis, removed, example_input)
    return new


def _removed_ids(analysis: _Analysis, keep: Mapping[str, Sequence[int] | torch.Tensor],
                 fold_constants: Mapping[str, torch.Tensor]) -> dict[int, float]:
    """Channel id -> the constant of ``fold_constants`` (0 if none) of every channel ``keep`` drops."""
    groups = {g.name: g for g in analysis.groups}
    for field, names in (("keep", keep), ("fold_constants", fold_constants)):
        for name in names:
            if name not in groups:
                raise accepted(field, name, groups)
    removed: dict[int, float] = {}
    for name, idx in keep.items():
        size = groups[name].size
        kept = _kept_indices(name, idx, size, granularity=groups[name].granularity)
        values = torch.as_tensor(fold_constants.get(name, [0.0] * size)).detach().double().flatten()
        if len(values) != size:
            raise UsageError(f"fold_constants[{name!r}]: expected {size} values, got {len(values)}")
        removed.update((analysis.keys[name][j], float(values[j])) for j in range(size) if j not in kept)
    return removed


def _checked_consumer_constants(analysis: _Analysis, given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    consumers = {name: len(layer.in_ids) for name, layer in analysis.layers.items() if _is_consumer(layer)}
    out = {}
    for name, values in given.items():
        if name not in consumers:
            raise accepted("consumer_constants", name, consumers)
        out[name] = torch.as_tensor(values).detach().double().flatten().cpu()
        if len(out[name]) != consumers[name]:
            raise UsageError(f"consumer_constants[{name!r}]: expected {consumers[name]} values (one per input "
                             f"column), got {len(out[name])}")
    return out


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


def constant_inputs(model: nn.Module, channels: Mapping[str, Sequence[int] | torch.Tensor], *,
                    example_input: torch.Tensor, rtol: float = 1e-5) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, list[int]]]:
    """What the consumers of ``channels`` ({group: indices}) read from them, for :func:`remove_channels`.

    Meant for a model in which those channels no longer depend on the input
    (their filters zeroed, or their scale): whatever lies between a producer
    and a consumer (activation, BatchNorm, pooling, a residual sum) is run, in
    eval mode on ``example_input``, and each consumer's input is read along
    the dim its channels lie on. Returns ``(constants, varying)``: per
    consumer layer, the value of every input column (that of a removed channel
    where it is one constant over the batch and the other dims, else 0) for
    ``consumer_constants``; per group, the channels whose value at some
    consumer is not one constant (they cannot be folded: keep them).

    >>> import torch
    >>> from autoslim.models import create_model
    >>> model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=3)
    >>> with torch.no_grad():
    ...     model.classifier.fc1.weight[:2] = 0
    ...     model.classifier.fc1.bias[:2] = torch.tensor([0.5, -1.0])
    >>> constants, varying = constant_inputs(model, {"classifier.fc1": [0, 1]}, example_input=torch.randn(4, 1, 8, 8))
    >>> constants["classifier.fc2"][:3].tolist(), varying   # relu(0.5), relu(-1); other columns read as 0
    ([0.5, 0.0, 0.0], {})
    """
    analysis = _analyse(model, example_input)
    groups = {g.name: g for g in analysis.groups}
    gone: dict[int, tuple[str, int]] = {}  # channel id -> (group, channel)
    for group, idx in channels.items():
        if group not in groups:
            raise accepted("channels", group, groups)
        if len(idx):
            gone.update((analysis.keys[group][j], (group, j))
                        for j in _kept_indices(group, idx, groups[group].size, granularity=groups[group].granularity))
    consumers = {name: analysis.roots(layer.in_ids) for name, layer in analysis.layers.items()
                 if _is_consumer(layer) and any(r in gone for r in analysis.roots(layer.in_ids))}
    stats: dict[str, tuple[torch.Tensor, ...]] = {}

    def on_input(name: str, value: torch.Tensor) -> None:
        d = analysis.layers[name].dim
        flat = value.detach().movedim(d, 0).reshape(value.shape[d], -1).double()
        new = (flat.amin(1), flat.amax(1), flat.sum(1), torch.full_like(flat[:, 0], flat.shape[1]))
        old = stats.get(name)
        stats[name] = new if old is None else (torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1]),
                                               old[2] + new[2], old[3] + new[3])

    _probe(analysis.module, model, [example_input], layer_inputs=list(consumers), on_input=on_input)
    constants, varying = {}, {}
    for name, roots in consumers.items():
        lo, hi, total, count = (t.cpu() for t in stats[name])
        steady = (hi - lo) <= rtol * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
        removed = torch.tensor([r in gone for r in roots])
        constants[name] = torch.where(removed & steady, total / count, 0.0).float()
        for j in torch.nonzero(removed & ~steady).flatten().tolist():
            group, channel = gone[roots[j]]
            varying.setdefault(group, set()).add(channel)
    return constants, {g: sorted(c) for g, c in varying.items()}


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
        add, shortcut, _ = sums[k or 0]
        add.replace_all_uses_with(shortcut)
        traced.graph.erase_node(add)
    traced.graph.eliminate_dead_code()
    kept = fx.GraphModule(block, traced.graph)  # holds only the layers and tensors the graph still uses
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, ResidualShortcut(kept, tuple(sorted(chosen.values()))))


def _torch_class(m: nn.Module) -> str:
    """The name of the torch.nn class ``m`` is (a user's subclass, ``ParametrizedConv2d``: its torch.nn base)."""
    return next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn.modules"))


def _layer_spec(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, _CONVS):
        return {"type": _torch_class(m), "in_channels": m.in_channels, "out_channels": m.out_channels,
                "groups": m.groups, "bias": m.bias is not None}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, _BatchNorm):
        return {"type": _torch_class(m), "num_features": m.num_features}
    if isinstance(m, nn.GroupNorm):
        return {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels}
    if isinstance(m, nn.PReLU):
        return {"type": "PReLU", "num_parameters": m.num_parameters}
    return None


def _custom_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers of modules outside torch.nn (the surgery may slice them per channel)."""
    for prefix, m in model.named_modules():
        if not m.__module__.startswith("torch.nn"):
            for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                yield f"{prefix}.{name}" if prefix else name, t


def architecture_spec(model: nn.Module) -> dict[str, Any]:
    """A JSON-serialisable description of the layer widths, removed blocks and attention head counts
    (:func:`autoslim.heads.heads_spec`) of ``model``.

    ``tensors`` gives the shapes of the parameters and buffers owned by custom
    modules (a learned per-channel scale loses entries with its channels).

    >>> from autoslim.models import create_model
    >>> architecture_spec(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10))["layers"]["classifier.fc3"]
    {'type': 'Linear', 'in_features': 100, 'out_features': 10, 'bias': True}
    """
    layers = {name: spec for name, m in model.named_modules() if (spec := _layer_spec(m)) is not None}
    removed = [branch for name, m in model.named_modules()
               for branch in ([name] if isinstance(m, ShortcutPath) else m.removed if
                              isinstance(m, ResidualShortcut) else ())]
    tensors = {name: list(t.shape) for name, t in _custom_tensors(model)}
    return {"layers": layers, "removed": removed, "tensors": tensors, "heads": heads_spec(model)}


_IN_SIZES = ("in_channels", "in_features", "num_features", "num_channels", "num_parameters")


def apply_architecture_spec(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """A copy of a freshly built ``model`` reshaped to ``spec``; load the pruned state_dict into it.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> build = lambda: create_model("lenet5", in_shape=(1, 8, 8), num_classes=10)
    >>> pruned = remove_channels(build(), {"features.conv1": [1, 5]}, example_input=torch.randn(1, 1, 8, 8))
    >>> rebuilt = apply_architecture_spec(build(), architecture_spec(pruned))
    >>> rebuilt.load_state_dict(pruned.state_dict())
    <All keys matched successfully>
    """
    new = remove_blocks(model, spec.get("removed", []))
    apply_heads_spec(new, spec.get("heads", {}))  # first: it slices the attention layers' own Linear layers
    modules = dict(new.named_modules())
    with torch.no_grad():
        for name, want in spec["layers"].items():
            m = modules.get(name)
            have = _layer_spec(m) if m is not None else None
            if have is None or have["type"] != want["type"]:
                raise UsageError(f"architecture spec: layer '{name}' ({want['type']}) not found in "
                                 f"{type(model).__name__}")
            sizes = [(k, want[k], have[k]) for k in want if k not in ("type", "bias")]
            if any(w > h for _, w, h in sizes):
                raise UsageError(f"architecture spec: layer '{name}' is wider in the spec than in the model")
            shrink = {k: list(range(w)) for k, w, h in sizes if w != h}
            in_keep = next((shrink[k] for k in _IN_SIZES if k in shrink), None)
            out_keep = shrink.get("out_channels", shrink.get("out_features"))
            if in_keep is not None or out_keep is not None:
                _resize(m, in_keep, out_keep)
            if want.get("bias") != have.get("bias"):
                _set_param(m, "bias", m.weight.new_zeros(m.weight.shape[0]) if want["bias"] else None)
        tensors = dict(_custom_tensors(new))
        for name, shape in spec.get("tensors", {}).items():
            t = tensors.get(name)
            if t is None or t.dim() != len(shape) or any(w > h for w, h in zip(shape, t.shape)):
                raise UsageError(f"architecture spec: tensor '{name}' of shape {shape} does not fit "
                                 f"{type(model).__name__}")
            if list(t.shape) != shape:
                owner, _, attr = name.rpartition(".")
                _set_param(new.get_submodule(owner), attr, t.detach()[tuple(slice(0, w) for w in shape)].clone())
    return new
