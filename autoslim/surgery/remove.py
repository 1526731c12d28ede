"""Removing channels: slicing every layer by the channel ids it sees (:func:`remove_channels`), folding what
removed channels still contributed, the dry run before training (:func:`check_removal`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from autoslim.errors import UsageError, accepted
from autoslim.surgery.analysis import RemovalError, _Analysis, _CONVS, _Layer, _Probe, _analyse, _eval_mode, _on_device_of, _one_line, _probe, _weight_kind, _where

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
    w = m.weight.detach().double()  # in float64, rounded once into the bias
    delta = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ constants.to(w)
    bias = delta if m.bias is None else m.bias.detach().double() + delta
    _set_param(m, "bias", bias.to(m.weight.dtype))


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
    of their window is padding (:func:`constant_inputs` reports such channels
    as ``padded`` and folds nothing for them: keep them).
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


def zero_padded(m: nn.Module) -> bool:
    """Whether ``m`` is a convolution that pads its input with zeros: a constant input channel is then not
    constant inside its windows at the border, and folding it into the bias is not exact."""
    if not isinstance(m, _CONVS) or m.padding_mode != "zeros":
        return False
    if m.padding == "same":
        return any(k > 1 for k in m.kernel_size)
    return m.padding != "valid" and any(p > 0 for p in m.padding)


BORDERS = ("exact", "fold")


class ConstantInputs(NamedTuple):
    """What :func:`constant_inputs` found: ``constants`` per consumer layer (one value per input column, for
    ``consumer_constants``); per group, the channels that cannot be folded exactly: ``varying`` (not one
    constant at some consumer) and ``padded`` (a non-zero constant read by a zero-padded convolution). With
    ``border="fold"`` the constants of ``padded`` are in ``constants`` all the same (exact inside the image,
    not in the border windows): ``padded_folded`` is then True and they are not :meth:`unfoldable`."""

    constants: dict[str, torch.Tensor]
    varying: dict[str, list[int]]
    padded: dict[str, list[int]]
    padded_folded: bool = False

    def unfoldable(self) -> dict[str, set[int]]:
        """Per group, the channels of :attr:`varying` and (unless folded) :attr:`padded`: to keep, or to remove
        inexactly."""
        out: dict[str, set[int]] = {}
        for part in (self.varying,) if self.padded_folded else (self.varying, self.padded):
            for group, channels in part.items():
                out.setdefault(group, set()).update(channels)
        return out


def _probe_wide(module: fx.GraphModule, model: nn.Module, x: torch.Tensor, *, reset: Any, **callbacks: Any) -> None:
    """:func:`_probe` on a float64 copy of ``model`` (the constants folded into float32 biases are then exact up to
    that one rounding); on ``model`` itself where the copy does not run (an op that builds a float32 tensor)."""
    if x.is_floating_point() and x.dtype != torch.float64:
        wide = copy_model(model).double()
        try:
            _probe(fx.GraphModule(wide, module.graph), wide, [x.double()], **callbacks)
            return
        except RemovalError:
            reset()
    _probe(module, model, [x], **callbacks)


def constant_inputs(model: nn.Module, channels: Mapping[str, Sequence[int] | torch.Tensor], *,
                    example_input: torch.Tensor, rtol: float = 1e-5, border: str = "exact") -> ConstantInputs:
    """What the consumers of ``channels`` ({group: indices}) read from them, for :func:`remove_channels`.

    Meant for a model in which those channels no longer depend on the input
    (their filters zeroed, or their scale): whatever lies between a producer
    and a consumer (activation, BatchNorm, pooling, a residual sum, a
    concatenation into layers that each apply their own BatchNorm, as in
    DenseNet) is run, in eval mode on ``example_input``, and each consumer's
    input is read along the dim its channels lie on (in float64). Returns
    :class:`ConstantInputs` ``(constants, varying, padded)``: per consumer
    layer, the value of every input column (that of a removed channel where it
    is one constant over the batch and the other dims and its fold is exact,
    else 0) for ``consumer_constants``; per group, the channels whose value at
    some consumer is not one constant (``varying``), and those whose constant
    is not 0 at a zero-padded convolution (``padded``: its border windows
    read padding, so no bias reproduces them). Neither can be folded exactly:
    keep them. With ``border="fold"`` a ``padded`` channel's constant is
    folded all the same (into a conv whose border windows then differ: the
    caller measures the change); it is still listed in ``padded``.

    >>> import torch
    >>> from autoslim.models import create_model
    >>> model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=3)
    >>> with torch.no_grad():
    ...     model.classifier.fc1.weight[:2] = 0
    ...     model.classifier.fc1.bias[:2] = torch.tensor([0.5, -1.0])
    >>> found = constant_inputs(model, {"classifier.fc1": [0, 1]}, example_input=torch.randn(4, 1, 8, 8))
    >>> found.constants["classifier.fc2"][:3].tolist(), found.varying   # relu(0.5), relu(-1); others read as 0
    ([0.5, 0.0, 0.0], {})
    """
    if border not in BORDERS:
        raise accepted("border", border, BORDERS)
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

    _probe_wide(analysis.module, model, example_input, layer_inputs=list(consumers), on_input=on_input,
                reset=stats.clear)
    constants: dict[str, torch.Tensor] = {}
    unfoldable: dict[str, dict[str, set[int]]] = {"varying": {}, "padded": {}}
    for name, roots in consumers.items():
        lo, hi, total, count = (t.cpu() for t in stats[name])
        steady = (hi - lo) <= rtol * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
        removed = torch.tensor([r in gone for r in roots])
        padded = steady & (torch.maximum(hi.abs(), lo.abs()) > 0) if zero_padded(model.get_submodule(name)) \
            else torch.zeros_like(steady)
        foldable = steady if border == "fold" else steady & ~padded
        constants[name] = torch.where(removed & foldable, total / count, 0.0)
        for kind, mask in (("varying", removed & ~steady), ("padded", removed & padded)):
            for j in torch.nonzero(mask).flatten().tolist():
                group, channel = gone[roots[j]]
                unfoldable[kind].setdefault(group, set()).add(channel)
    return ConstantInputs(constants, *({g: sorted(c) for g, c in unfoldable[kind].items()}
                                       for kind in ("varying", "padded")), padded_folded=border == "fold")
