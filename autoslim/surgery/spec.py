"""The architecture spec: a JSON-serialisable description of a reduced model's widths, removed blocks and head
counts (:func:`architecture_spec`), and rebuilding it from a fresh model (:func:`apply_architecture_spec`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from autoslim.errors import UsageError
from autoslim.surgery.analysis import _CONVS
from autoslim.surgery.blocks import ResidualShortcut, ShortcutPath, remove_blocks
from autoslim.surgery.heads import apply_heads_spec, heads_spec
from autoslim.surgery.remove import _resize, _set_param

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
    (:func:`autoslim.surgery.heads.heads_spec`) of ``model``.

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
    >>> from autoslim.surgery import remove_channels
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
