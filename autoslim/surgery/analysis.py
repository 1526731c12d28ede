"""The channel analysis: which channels of which layers must be removed together (:class:`ChannelGroup`),
where they pass their nonlinearities, and reading values on the traced model (:func:`probe`).

See :mod:`autoslim.surgery` for what each op does to the channels.
"""

from __future__ import annotations

import operator
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

from autoslim.errors import UsageError

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
