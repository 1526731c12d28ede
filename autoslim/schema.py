"""Study-file values checked against typed dataclasses: one UsageError line naming the field and what is accepted.

A dataclass field's type says what a value may be (``int``, ``float``, ``str``,
``bool``, ``list[...]``, ``dict``, a nested dataclass, a union, ``None``), and its
metadata (:func:`meta`) the range or choices. :func:`build` checks a mapping
against a dataclass, every key and value, and builds it.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Train:
...     epochs: int = field(default=10, metadata=meta(min=0))
...     optimizer: str = field(default="sgd", metadata=meta(choices=["sgd", "adam"]))
>>> build(Train, {"epochs": 3}, "train")
Train(epochs=3, optimizer='sgd')
>>> build(Train, {"epochs": -1}, "train")
Traceback (most recent call last):
...
autoslim.errors.UsageError: train.epochs: -1 is out of range; accepted: >= 0
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from autoslim.errors import UsageError


def meta(**kw) -> dict:
    """A field's checks: ``min``, ``max``, ``min_exclusive``, ``choices``, ``count_or_fraction``."""
    return kw


def check(path: str, value: Any, tp: Any, rules: dict) -> Any:
    """Check ``value`` (at ``path``) against type ``tp`` and the field's ``rules`` (:func:`meta`); return it
    converted (an int for a float field becomes a float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check(path, value, arg, rules)
            except UsageError as e:
                errors.append(str(e))
        typed = [e for e in errors if not e.startswith(f"{path}: expected ")]  # of the type, but out of range
        raise UsageError(typed[-1] if typed else errors[-1] if len(errors) == 1 else
                         f"{path}: expected {' or '.join(_name(a) for a in args if a is not type(None))}"
                         f"{' or null' if type(None) in args else ''}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [check(f"{path}[{i}]", v, item, {}) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{path}: expected a string, got {value!r}")
    if "choices" in rules and value not in rules["choices"]:
        raise UsageError(f"{path}: unknown value {value!r}; accepted: {', '.join(map(str, rules['choices']))}")
    lo, hi = rules.get("min"), rules.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (
            rules.get("min_exclusive") is not None and value <= rules["min_exclusive"]):
        lo_s = f"> {rules['min_exclusive']}" if rules.get("min_exclusive") is not None else (f">= {lo}" if lo is not None else "")
        hi_s = f"<= {hi}" if hi is not None else ""
        raise UsageError(f"{path}: {value!r} is out of range; accepted: {' and '.join(s for s in (lo_s, hi_s) if s)}")
    if rules.get("count_or_fraction") and tp is float and value > 1:
        raise UsageError(f"{path}: {value!r} is out of range; accepted: a count >= 1 or a fraction in (0, 1]")
    return value


def _name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def build(cls, raw: Any, path: str):
    """Build dataclass ``cls`` from a mapping, checking every key and value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path or cls.__name__}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = set(raw) - set(fields)
    if unknown:
        key = sorted(map(str, unknown))[0]
        raise UsageError(f"{path + '.' if path else ''}{key}: unknown key; accepted: {', '.join(fields)}")
    kwargs = {k: check(f"{path + '.' if path else ''}{k}", v, hints[k], dict(fields[k].metadata))
              for k, v in raw.items()}
    return cls(**kwargs)
