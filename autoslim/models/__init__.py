"""Model families, registered by name (:mod:`autoslim.models.base`). Importing this package registers them all.

>>> from autoslim.models import create_model
>>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
>>> sum(p.numel() for p in model.parameters())
431080
"""

import importlib
import pkgutil

from autoslim.models.base import MODELS, create_model, list_models, register_model

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
