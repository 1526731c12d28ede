"""Name-keyed registries: methods, models and data sets are all found by name through one small class.

A name in a study file, an exported config and a test id is the registry key.
A registry resolves a name in three ways, in this order:

1. registered in this process (``@register_method``, ``@register_model(name)``, ...);
2. an installed package's entry point in the registry's group
   (``autoslim.methods``, ``autoslim.models``, ``autoslim.datasets``), loaded on first use;
3. an import string ``package.module:attribute`` (the attribute may be dotted), so
   a study file can name the user's own code without registering it.

Every registry refuses a second entry under a taken name (a silent overwrite
would change what an existing study means), and an unknown name, an import
string that does not import, or an object of the wrong kind is one
:class:`~autoslim.errors.UsageError` line naming the study-file field.

>>> colours = Registry("colour", field="paint.colour")
>>> @colours.register("red")
... def red():
...     return (255, 0, 0)
>>> colours.get("red")(), colours.names(), "red" in colours
((255, 0, 0), ['red'], True)
>>> colours.get("blue")
Traceback (most recent call last):
...
autoslim.errors.UsageError: paint.colour: unknown value 'blue'; accepted: red, or an import string 'package.module:name'
>>> colours.get("math:pi")
3.141592653589793
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Callable, Generic, TypeVar

from autoslim.errors import UsageError

T = TypeVar("T")


def is_import_string(name: object) -> bool:
    """Whether ``name`` has the form ``package.module:attribute``.

    >>> is_import_string("torchvision.models:resnet18"), is_import_string("resnet18")
    (True, False)
    """
    if not isinstance(name, str) or name.count(":") != 1:
        return False
    module, attr = name.split(":")
    return all(part.isidentifier() for part in module.split(".") + attr.split("."))


def import_object(spec: str, *, field: str) -> Any:
    """The object an import string ``package.module:attribute`` names; one UsageError line naming ``field``,
    the string and why if it cannot be had (malformed, module not found, no such attribute, import failed).

    >>> import_object("os.path:join", field="x").__name__
    'join'
    >>> import_object("os.path:nope", field="model")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: model: 'os.path:nope': module 'os.path' has no attribute 'nope'
    """
    if not is_import_string(spec):
        raise UsageError(f"{field}: {spec!r} is not an import string; accepted: 'package.module:name'")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UsageError(f"{field}: {spec!r}: module {e.name or module_name!r} not found "
                         f"(is its package installed, or its folder on PYTHONPATH?)") from None
    except Exception as e:  # the user's module raised while importing
        raise UsageError(f"{field}: {spec!r}: importing {module_name!r} failed: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{field}: {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def named_arguments(fn: Callable, candidates: dict[str, Any]) -> dict[str, Any]:
    """The ``candidates`` that ``fn``'s signature names (a ``**kwargs`` catch-all names none of them).

    >>> named_arguments(lambda *, in_shape, hidden=2: None, {"in_shape": (1, 8, 8), "num_classes": 3})
    {'in_shape': (1, 8, 8)}
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    return {k: v for k, v in candidates.items()
            if k in params and params[k].kind in (params[k].POSITIONAL_OR_KEYWORD, params[k].KEYWORD_ONLY)}


def check_callable(obj: Any, where: str) -> None:
    """A registry ``check``: the object must be callable (a factory, a source)."""
    if not callable(obj):
        raise UsageError(f"{where}: expected a callable, got {type(obj).__name__} {obj!r}")


def import_callable(spec: str, *, field: str) -> Callable:
    """The callable an import string names, for a study-file field that takes one (``train.fit``); one
    UsageError line naming ``field``, the string and why if it cannot be had or is not callable.

    >>> import_callable("math:pi", field="train.fit")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: train.fit: 'math:pi': expected a callable, got float 3.141592653589793
    """
    obj = import_object(spec, field=field)
    check_callable(obj, f"{field}: {spec!r}")
    return obj


class Registry(Generic[T]):
    """Things of one ``kind`` by name; ``field`` is how a study file names the choice (for error lines).

    ``group`` is the entry-point group installed packages register names in; ``check(obj, where)`` validates an
    object that comes from an entry point or an import string (raise a UsageError naming ``where``).
    """

    def __init__(self, kind: str, *, field: str, group: str | None = None,
                 check: Callable[[Any, str], None] | None = None) -> None:
        self.kind, self.field, self.group, self._check = kind, field, group, check
        self._items: dict[str, T] = {}
        self._imported: dict[str, T] = {}  # entry points and import strings, resolved once

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``; ValueError if the name is taken."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name: expected a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests register things of their own and take them back)."""
        del self._items[name]

    def get(self, name: str, *, field: str | None = None) -> T:
        """The object ``name`` stands for (registered, an entry point, or an import string); a UsageError line
        naming ``field`` (default: the registry's) if there is none."""
        field = field or self.field
        if name in self._items:
            return self._items[name]
        if name not in self._imported:
            self._imported[name] = self._resolve(name, field)
        return self._imported[name]

    def _resolve(self, name: str, field: str) -> T:
        entry = self._entry_points().get(name) if isinstance(name, str) else None
        if entry is not None:
            where = f"{field}: {name!r} (entry point {entry.value!r} in group {self.group!r})"
            try:
                obj = entry.load()
            except Exception as e:
                raise UsageError(f"{where}: loading it failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
        elif is_import_string(name):
            where, obj = f"{field}: {name!r}", import_object(name, field=field)
        else:
            choices = ", ".join(self.names())
            raise UsageError(f"{field}: unknown value {name!r}; accepted: {choices}, or an import string "
                             "'package.module:name'")
        if self._check is not None:
            self._check(obj, where)
        return obj

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        if self.group is None:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``built-in`` (registered in this process), ``entry point 'pkg.mod:obj'``
        or ``import string``.

        >>> Registry("colour", field="colour").origin("math:pi")
        'import string'
        """
        if name in self._items:
            return "built-in"
        entry = self._entry_points().get(name)
        return f"entry point {entry.value!r}" if entry is not None else "import string"

    def names(self) -> list[str]:
        """Every registered and installed (entry-point) name, sorted."""
        return sorted(set(self._items) | set(self._entry_points()))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._entry_points()
