"""Search spaces: a method's YAML file (``search_spaces/<method>.yaml`` for the built-in methods, a file beside
its module for a method in the user's package: :meth:`autoslim.methods.Method.search_space`) turned into
Optuna suggest calls.

A search-space file declares each hyperparameter once::

    method: trimming
    summary: one line on what the method does
    params:
      rounds:  {type: int, low: 1, high: 4, default: 2}
      alpha:   {type: float, low: 0.0, high: 2.0, default: 1.0}
      lr:      {type: float, low: 1.0e-4, high: 0.1, log: true, default: 0.01}
      rule:    {type: categorical, choices: [std, fraction], default: std}
      examples: {type: int, low: 100, high: 10000, default: 2000, search: false}
    paper_default: {rounds: 3, alpha: 1.0}   # the published configuration

A study file narrows it without editing the file: a scalar pins a value, a
mapping narrows a range (``{low: 1, high: 2}``) or the choices. A parameter
declared ``search: false`` is a setting, not a knob: it keeps its default
unless a study file gives it a value or a range (a mapping, even ``{}``, opens
it to the search). ThriftyNet's ``filters`` is one: sampled freely it would
override the parameter ``budget`` in nearly every trial. The Optuna
parameter of ``rounds`` under method ``trimming`` is named ``trimming.rounds``,
so one study can hold every method's parameters without collisions.

>>> space = SearchSpace.load("trimming").narrow({"rounds": 1}, where="methods.trimming")
>>> space.params["rounds"].pinned, space.defaults()["rounds"]
(True, 1)
>>> space.params["apoz_examples"].pinned   # search: false
True
>>> SearchSpace.load("trimming").narrow({"apoz_examples": {"high": 5000}}, where="m").params["apoz_examples"].pinned
False
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Mapping

import optuna

from autoslim.config import load_yaml
from autoslim.errors import UsageError

_TYPES = ("int", "float", "categorical", "bool")


def spaces_dir() -> Path:
    """The folder of search-space files (``search_spaces/`` of the repository or the installed package)."""
    repo = Path(__file__).resolve().parents[1] / "search_spaces"
    if repo.is_dir():
        return repo
    return Path(str(resources.files("autoslim.search_spaces")))


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    pinned: bool = False

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` if it lies in this parameter's domain, else raise a UsageError naming ``where``."""
        if self.type in ("categorical", "bool"):
            choices = self.choices if self.type == "categorical" else (False, True)
            if value not in choices:
                raise UsageError(f"{where}: unknown value {value!r}; accepted: {', '.join(map(str, choices))}")
            return value
        kind = int if self.type == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{where}: expected {'an integer' if self.type == 'int' else 'a number'}, got {value!r}")
        if not self.low <= value <= self.high:
            raise UsageError(f"{where}: {value!r} is out of range; accepted: {self.low} to {self.high}")
        return value

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        if self.pinned:
            return self.default
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.type == "float":
            return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "bool":
            return trial.suggest_categorical(key, [False, True])
        return trial.suggest_categorical(key, list(self.choices))

    def narrow(self, override: Any, where: str) -> "Param":
        """A scalar pins the value; a mapping narrows the range or choices and opens the parameter to the search."""
        if not isinstance(override, dict):
            return dataclasses.replace(self, default=self.check(override, where), pinned=True)
        allowed = {"choices"} if self.type in ("categorical", "bool") else {"low", "high", "log", "step"}
        unknown = set(override) - allowed - {"default"}
        if unknown:
            raise UsageError(f"{where}.{sorted(unknown)[0]}: unknown key; accepted: {', '.join(sorted(allowed | {'default'}))}")
        new = dataclasses.replace(self, pinned=False,
                                  **{k: override[k] for k in ("low", "high", "log", "step") if k in override})
        if "choices" in override:
            if not isinstance(override["choices"], list) or not override["choices"]:
                raise UsageError(f"{where}.choices: expected a non-empty list")
            new = dataclasses.replace(new, choices=tuple(self.check(c, f"{where}.choices") for c in override["choices"]),
                                      type="categorical")
        if self.type in ("int", "float"):
            for k in ("low", "high"):
                self.check(getattr(new, k), f"{where}.{k}")
            if new.low > new.high:
                raise UsageError(f"{where}: low {new.low} is above high {new.high}")
            if new.log and new.low <= 0:
                raise UsageError(f"{where}.log: a log scale needs low > 0")
        default = override.get("default", self.default)
        if self.type in ("int", "float") and "default" not in override:
            default = min(max(default, new.low), new.high)
        if new.choices and default not in new.choices:
            default = new.choices[0]
        return dataclasses.replace(new, default=new.check(default, f"{where}.default"))


@dataclass(frozen=True)
class SearchSpace:
    method: str
    params: dict[str, Param]
    summary: str = ""
    paper_default: dict = field(default_factory=dict)

    @classmethod
    def load(cls, method: str) -> "SearchSpace":
        """The space of built-in method ``method`` (``search_spaces/<method>.yaml``)."""
        return cls.read(spaces_dir() / f"{method}.yaml", method=method)

    @classmethod
    def read(cls, path: str | Path, *, method: str) -> "SearchSpace":
        """The space a YAML file declares, read and checked once per file and process (the result is shared:
        :meth:`narrow` and :func:`dataclasses.replace` make changed copies)."""
        return _read(str(Path(path).resolve()), method)

    @classmethod
    def from_dict(cls, raw: dict, *, where: str) -> "SearchSpace":
        params = {}
        for name, spec in (raw.get("params") or {}).items():
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in _TYPES:
                raise UsageError(f"{where}: params.{name}.type: unknown value {kind!r}; accepted: {', '.join(_TYPES)}")
            if "default" not in spec:
                raise UsageError(f"{where}: params.{name}.default is missing")
            if "choices" in spec:
                spec["choices"] = tuple(spec["choices"])
            searched = spec.pop("search", True)
            if not isinstance(searched, bool):
                raise UsageError(f"{where}: params.{name}.search: expected true or false, got {searched!r}")
            unknown = set(spec) - {"default", "low", "high", "log", "step", "choices"}
            if unknown:
                raise UsageError(f"{where}: params.{name}.{sorted(unknown)[0]}: unknown key; accepted: "
                                 "type, default, low, high, log, step, choices, search")
            params[name] = Param(name=name, type=kind, pinned=not searched, **spec)
            params[name].check(params[name].default, f"{where}: params.{name}.default")
        space = cls(method=raw.get("method", Path(where).stem), params=params, summary=raw.get("summary", ""),
                    paper_default=dict(raw.get("paper_default") or {}))
        space.complete(space.paper_default, where=f"{where}: paper_default")
        return space

    def narrow(self, overrides: Mapping[str, Any], *, where: str) -> "SearchSpace":
        """A copy with values pinned or ranges narrowed by a study file's overrides."""
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise UsageError(f"{where}.{sorted(unknown)[0]}: unknown parameter of {self.method!r}; "
                             f"accepted: {', '.join(sorted(self.params))}")
        params = {n: (p.narrow(overrides[n], f"{where}.{n}") if n in overrides else p) for n, p in self.params.items()}
        return dataclasses.replace(self, params=params)

    def defaults(self) -> dict:
        return {n: p.default for n, p in self.params.items()}

    def complete(self, values: Mapping[str, Any], *, where: str) -> dict:
        """``values`` checked against the space, with defaults for the parameters it does not give."""
        unknown = set(values) - set(self.params)
        if unknown:
            raise UsageError(f"{where}.{sorted(unknown)[0]}: unknown parameter of {self.method!r}; "
                             f"accepted: {', '.join(sorted(self.params))}")
        return {n: (p.check(values[n], f"{where}.{n}") if n in values else p.default) for n, p in self.params.items()}

    def suggest(self, trial: optuna.Trial, *, fixed: Collection[str] = ()) -> dict:
        """Sample this method's parameters (Optuna names ``<method>.<param>``); pinned ones, and those named in
        ``fixed`` (the size knobs of a trial given a size target), are not sampled: they keep their defaults."""
        return {n: p.default if n in fixed else p.suggest(trial, f"{self.method}.{n}") for n, p in self.params.items()}

    def describe(self) -> list[dict]:
        """Each knob as plain data: name, type, range or choices, default, and whether it is searched or a
        setting (``search: false``, or pinned by a study file); for ``autoslim methods``.

        >>> SearchSpace.load("trimming").describe()[0]
        {'name': 'rounds', 'type': 'int', 'low': 1, 'high': 6, 'log': False, 'default': 3, 'searched': True}
        """
        out = []
        for p in self.params.values():
            domain = {"choices": list(p.choices)} if p.type == "categorical" else {} if p.type == "bool" else {
                "low": p.low, "high": p.high, "log": p.log, **({"step": p.step} if p.step is not None else {})}
            out.append({"name": p.name, "type": p.type, **domain, "default": p.default, "searched": not p.pinned})
        return out

    def optuna_params(self, values: Mapping[str, Any]) -> dict:
        """``values`` as the Optuna parameters of a trial under this method (for ``enqueue_trial``)."""
        return {"method": self.method, **{f"{self.method}.{n}": v for n, v in values.items()
                                          if not self.params[n].pinned}}


@functools.lru_cache(maxsize=None)
def _read(path: str, method: str) -> SearchSpace:
    raw = load_yaml(path, what=f"search space of {method!r}")
    return SearchSpace.from_dict(raw, where=path)
