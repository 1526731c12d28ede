"""Compression methods, registered by name. Importing this package registers every built-in method."""

import importlib
import pkgutil

from autoslim.methods.base import (METHODS, CompressionResult, Method, TrialContext, describe_method, get_method,
                                   list_methods, register_method)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "CompressionResult", "Method", "TrialContext", "describe_method", "get_method", "list_methods", "register_method"]
