"""The model registry: ``factory(*, in_shape, num_classes, **kwargs) -> nn.Module`` by name.

The name in a study file, the exported config and the test ids are the same
string. Every factory takes the input shape ``(C, H, W)`` and the class count,
so one name builds a network for digits (1x8x8), MNIST (1x28x28) or
CIFAR-10 (3x32x32).

>>> @register_model("tiny_mlp")
... def tiny_mlp(*, in_shape, num_classes, hidden=8):
...     return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], hidden), nn.ReLU(),
...                          nn.Linear(hidden, num_classes))
>>> create_model("tiny_mlp", in_shape=(1, 8, 8), num_classes=10, hidden=4)[1]
Linear(in_features=64, out_features=4, bias=True)
>>> MODELS.remove("tiny_mlp")
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from autoslim.registry import Registry, check_callable

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model", field="model", group="autoslim.models", check=check_callable)


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(*, in_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return MODELS.names()


def create_model(name: str, *, in_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape ``in_shape`` (C, H, W)."""
    return MODELS.get(name)(in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)
