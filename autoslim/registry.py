"""Name-keyed registries: methods, models and data sets are all found by name through one small class.

A name in a study file, an exported config and a test id is the registry key.
Every registry refuses a second entry under a taken name (a silent overwrite
would change what an existing study means), and an unknown name is one
:class:`~autoslim.errors.UsageError` line naming the study-file field and the
names it accepts.

>>> colours = Registry("colour", field="paint.colour")
>>> @colours.register("red")
... def red():
...     return (255, 0, 0)
>>> colours.get("red")(), colours.names(), "red" in colours
((255, 0, 0), ['red'], True)
>>> colours.get("blue")
Traceback (most recent call last):
...
autoslim.errors.UsageError: paint.colour: unknown value 'blue'; accepted: red
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from autoslim.errors import accepted

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one ``kind`` by name; ``field`` is how a study file names the choice (for error lines)."""

    def __init__(self, kind: str, *, field: str) -> None:
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

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
        """The object registered under ``name``; a UsageError line naming ``field`` (default: the registry's)
        if there is none."""
        if name not in self._items:
            raise accepted(field or self.field, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
