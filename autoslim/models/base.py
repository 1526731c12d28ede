"""The model registry: a factory returning an ``nn.Module``, by name or import string.

The name in a study file, the exported config and the test ids are the same
string. A model is any callable that returns an ``nn.Module``: registered here
(:func:`register_model`), an installed package's entry point in the group
``autoslim.models``, or an import string such as ``torchvision.models:resnet18``.
It is called with the study's ``model_kwargs`` and, where its signature names
them, ``in_shape`` (the data's ``(C, H, W)``) and ``num_classes``: autoslim's own
factories name both, so one name builds a network for digits (1x8x8), MNIST
(1x28x28) or CIFAR-10 (3x32x32); ``torchvision.models:resnet18`` names neither.
``model_adapt`` (:mod:`autoslim.models.adapt`) fits the first convolution and the
classifier of a network that does not take the data's channels or classes; a
network that does not fit and is not adapted is refused in one line.

>>> @register_model("tiny_mlp")
... def tiny_mlp(*, in_shape, num_classes, hidden=8):
...     return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], hidden), nn.ReLU(),
...                          nn.Linear(hidden, num_classes))
>>> create_model("tiny_mlp", in_shape=(1, 8, 8), num_classes=10, hidden=4)[1]
Linear(in_features=64, out_features=4, bias=True)
>>> MODELS.remove("tiny_mlp")
>>> create_model("torch.nn:Identity", in_shape=(1, 8, 8), num_classes=10)
Traceback (most recent call last):
...
autoslim.errors.UsageError: model: 'torch.nn:Identity' gives outputs of shape (1, 8, 8), the data has 10 classes; set model_adapt: [num_classes] (or the factory's own argument in model_kwargs)
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from autoslim.errors import UsageError
from autoslim.models.adapt import adapt_model, check_fits
from autoslim.registry import Registry, check_callable, named_arguments

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", field="model", group="autoslim.models", check=check_callable)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(*, in_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return MODELS.names()


def create_model(name: str, *, in_shape: tuple[int, int, int], num_classes: int, adapt: Sequence[str] = (),
                 **kwargs) -> nn.Module:
    """Build model ``name`` (registered, an entry point or an import string) for inputs of shape ``in_shape``
    (C, H, W) and ``num_classes`` classes: the factory gets ``kwargs`` (the study's ``model_kwargs``) and the
    ones of ``in_shape``/``num_classes`` its signature names; ``adapt`` (``model_adapt``) fits its first
    convolution and its classifier to the data. A factory that fails or returns no ``nn.Module``, or a
    network that does not fit the data, is one UsageError line."""
    factory = MODELS.get(name)
    given = {**named_arguments(factory, {"in_shape": tuple(in_shape), "num_classes": num_classes}), **kwargs}
    try:
        model = factory(**given)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"model: {name!r} failed with model_kwargs {kwargs}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model: {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if adapt:
        model = adapt_model(model, adapt, name=name, in_shape=in_shape, num_classes=num_classes)
    check_fits(model, name=name, in_shape=in_shape, num_classes=num_classes)
    return model
