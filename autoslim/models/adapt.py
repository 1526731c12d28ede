"""Fitting a user's network to the data: adapt its first convolution and its classifier when asked, and refuse,
in one line that says what to set, a network whose input channels or class count do not fit.

A study file's ``model_adapt`` lists what autoslim may change (nothing by default):

- ``in_channels``: the first convolution the input reaches gets the data's channel count. Its new filters are
  the old ones summed over their input channels and shared equally among the new ones, so a pretrained network
  sees a grey image repeated on every channel as before.
- ``num_classes``: the last Linear (or convolution) the input reaches gets the data's class count, freshly
  initialised.

The layers are found by running the network once on a zero batch, so "first" and "last" follow the forward
pass, not the order of attributes.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(1000))
>>> _ = net(torch.zeros(1, 3, 8, 8))
>>> check_fits(net, name="mynet", in_shape=(1, 8, 8), num_classes=10)
Traceback (most recent call last):
...
autoslim.errors.UsageError: model: 'mynet' takes 3 input channels (first layer '0'), the data has 1; set model_adapt: [in_channels]
>>> net = adapt_model(net, ["in_channels", "num_classes"], name="mynet", in_shape=(1, 8, 8), num_classes=10)
>>> net[0], net[3]
(Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1)), Linear(in_features=144, out_features=10, bias=True))
>>> check_fits(net, name="mynet", in_shape=(1, 8, 8), num_classes=10)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from autoslim.errors import UsageError

ADAPTS = ("in_channels", "num_classes")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVS, nn.Linear)


class _Stop(Exception):
    """Raised by the hook that found the first layer: the rest of the forward pass is not needed."""


def _run(model: nn.Module, in_shape: Sequence[int], *, first_only: bool = False):
    """The names of the conv/linear layers the forward pass of a zero batch reaches, in order, and its output
    (None if it stopped at the first layer); an exception the forward pass raised is returned as the output."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(module, args):
        order.append(names[module])
        if first_only:
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    param = next(model.parameters(), None)
    x = torch.zeros(2, *in_shape, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except _Stop:
        out = None
    except Exception as e:  # a network that does not fit the input: the caller says why
        out = e
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order, out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _resized(layer: nn.Module, *, in_channels: int | None = None, out: int | None = None) -> nn.Module:
    """A copy of conv or linear ``layer`` with ``in_channels`` inputs or ``out`` outputs (on its device)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, out, bias=layer.bias is not None)
    else:
        new = type(layer)(in_channels or layer.in_channels, out or layer.out_channels, layer.kernel_size,
                          stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                          bias=layer.bias is not None, padding_mode=layer.padding_mode)
    new = new.to(device=w.device, dtype=w.dtype)
    if in_channels is not None:  # the old filters summed over their inputs, shared equally by the new ones
        with torch.no_grad():
            new.weight.copy_(w.sum(1, keepdim=True).expand_as(new.weight) / in_channels)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
    return new


def adapt_model(model: nn.Module, adapt: Sequence[str], *, name: str, in_shape: Sequence[int],
                num_classes: int) -> nn.Module:
    """``model`` with its first convolution taking ``in_shape[0]`` channels (``"in_channels"`` in ``adapt``) and
    its last layer giving ``num_classes`` outputs (``"num_classes"``); a UsageError line naming ``model_adapt``
    if it has no such layer."""
    if "in_channels" in adapt:
        order, _ = _run(model, in_shape, first_only=True)
        first = model.get_submodule(order[0]) if order else None
        if not isinstance(first, _CONVS) or first.groups != 1:
            what = f"its first layer {order[0]!r} is {type(first).__name__}" if order else "no layer was reached"
            raise UsageError(f"model_adapt: in_channels: model {name!r} cannot be adapted ({what}); accepted: a "
                             "model whose input first reaches a convolution with groups=1")
        if first.in_channels != in_shape[0]:
            _replace(model, order[0], _resized(first, in_channels=in_shape[0]))
    if "num_classes" in adapt:
        order, out = _run(model, in_shape)
        last = model.get_submodule(order[-1]) if order else None
        if isinstance(out, Exception):
            check_fits(model, name=name, in_shape=in_shape, num_classes=num_classes)  # says why, in one line
        if not isinstance(last, _LAYERS):
            raise UsageError(f"model_adapt: num_classes: model {name!r} cannot be adapted (no Linear or "
                             "convolution was reached); accepted: a model that ends in one")
        size = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        if size != num_classes:
            _replace(model, order[-1], _resized(last, out=num_classes))
    return model


def check_fits(model: nn.Module, *, name: str, in_shape: Sequence[int], num_classes: int) -> None:
    """Refuse, in one UsageError line that says what to set, a model that cannot take inputs of ``in_shape``
    or does not output ``num_classes`` logits per input."""
    order, out = _run(model, in_shape)
    if isinstance(out, Exception):
        first = model.get_submodule(order[0]) if order else None
        if isinstance(first, _CONVS) and first.in_channels != in_shape[0]:
            raise UsageError(f"model: {name!r} takes {first.in_channels} input channels (first layer "
                             f"{order[0]!r}), the data has {in_shape[0]}; set model_adapt: [in_channels]")
        raise UsageError(f"model: {name!r} cannot run on the data's inputs of shape {tuple(in_shape)}: "
                         f"{type(out).__name__}: {' '.join(str(out).split())}")
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        got = f"gives outputs of shape {tuple(out.shape[1:])}" if isinstance(out, torch.Tensor) else \
            f"returns {type(out).__name__}, not a tensor of logits"
        if isinstance(out, torch.Tensor) and out.ndim == 2:
            got = f"outputs {out.shape[1]} classes" + (f" (last layer {order[-1]!r})" if order else "")
        raise UsageError(f"model: {name!r} {got}, the data has {num_classes} classes; set model_adapt: "
                         "[num_classes] (or the factory's own argument in model_kwargs)")
