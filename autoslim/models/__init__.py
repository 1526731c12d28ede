"""Name-keyed model registry.

The name in a study file, the exported config and the test ids are the same
string. Every factory takes the input shape ``(C, H, W)`` and the class count,
so one name builds a network for digits (1x8x8), MNIST (1x28x28) or
CIFAR-10 (3x32x32).

>>> from autoslim.models import create_model
>>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
>>> sum(p.numel() for p in model.parameters())
431080
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from autoslim.errors import accepted

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(*, in_shape, num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def create_model(name: str, *, in_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` for inputs of shape ``in_shape`` (C, H, W)."""
    if name not in _MODELS:
        raise accepted("model", name, _MODELS)
    return _MODELS[name](in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)


def _import_families() -> None:
    """Import every module of this package: each registers its models."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_import_families()

__all__ = ["create_model", "list_models", "register_model"]
