"""Study and trial configuration: dataclasses, YAML loading, validation.

Config is data. A study file (``studies/*.yaml``) is loaded into a
:class:`StudyConfig`; every trial's sampled configuration is one
:class:`TrialConfig`, saved with the trial (user attr ``config``) and read back
by ``show``, ``export`` and ``train``. Every value is checked when loaded:
an unknown key, a wrong type or an out-of-range value raises
:class:`~autoslim.errors.UsageError` naming the field and what is accepted.

>>> cfg = StudyConfig.from_dict({"name": "demo", "methods": ["trimming"], "n_trials": 3})
>>> cfg.data.name, cfg.model, cfg.n_trials
('digits', 'lenet5', 3)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from autoslim.errors import UsageError


STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
STUDY_NAME_RULE = "1 to 100 letters, digits, '-', '_' or '.', not starting with '-' or '.'"


def check_study_name(name: Any, field: str = "name") -> str:
    """``name`` if it is a valid study name, else a UsageError naming ``field``.

    A study name becomes a file or folder name (``<name>.db`` beside the study
    file, ``reports/<name>``), so it may hold only letters, digits, ``-``, ``_``
    and ``.``, cannot start with ``-`` or ``.``, and is at most 100 characters.

    >>> check_study_name("quickstart-2.v1")
    'quickstart-2.v1'
    >>> check_study_name("../escaped")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: name: '../escaped' is not a valid study name; accepted: 1 to 100 letters, ...
    """
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise UsageError(f"{field}: {name!r} is not a valid study name; accepted: {STUDY_NAME_RULE}")
    return name


def _check(path: str, value: Any, tp: Any, meta: dict) -> Any:
    """Check ``value`` against type ``tp`` and the field's metadata; return it converted."""
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
                return _check(path, value, arg, meta)
            except UsageError as e:
                errors.append(str(e))
        typed = [e for e in errors if not e.startswith(f"{path}: expected ")]  # of the type, but out of range
        raise UsageError(typed[-1] if typed else errors[-1] if len(errors) == 1 else
                         f"{path}: expected {' or '.join(_name(a) for a in args if a is not type(None))}"
                         f"{' or null' if type(None) in args else ''}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(f"{path}[{i}]", v, item, {}) for i, v in enumerate(value)]
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
    if "choices" in meta and value not in meta["choices"]:
        raise UsageError(f"{path}: unknown value {value!r}; accepted: {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (
            meta.get("min_exclusive") is not None and value <= meta["min_exclusive"]):
        lo_s = f"> {meta['min_exclusive']}" if meta.get("min_exclusive") is not None else (f">= {lo}" if lo is not None else "")
        hi_s = f"<= {hi}" if hi is not None else ""
        raise UsageError(f"{path}: {value!r} is out of range; accepted: {' and '.join(s for s in (lo_s, hi_s) if s)}")
    if meta.get("count_or_fraction") and tp is float and value > 1:
        raise UsageError(f"{path}: {value!r} is out of range; accepted: a count >= 1 or a fraction in (0, 1]")
    return value


def _name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls, raw: Any, path: str):
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
    kwargs = {k: _check(f"{path + '.' if path else ''}{k}", v, hints[k], dict(fields[k].metadata))
              for k, v in raw.items()}
    return cls(**kwargs)


def _meta(**kw) -> dict:
    return kw


@dataclass
class DataConfig:
    """Which data to train on and how it is split."""

    name: str = "digits"
    data_dir: str | None = None
    download: bool = True
    val_fraction: float = field(default=0.15, metadata=_meta(min_exclusive=0.0, max=0.9))
    test_fraction: float = field(default=0.2, metadata=_meta(min_exclusive=0.0, max=0.9))
    train_subset: int | float | None = field(default=None, metadata=_meta(min_exclusive=0, count_or_fraction=True))
    test_subset: int | None = field(default=None, metadata=_meta(min=1))
    augment: bool | None = None
    seed: int = 0
    image_size: int | None = field(default=None, metadata=_meta(min=4))
    # synthetic data only
    image_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    num_classes: int = field(default=4, metadata=_meta(min=2))
    num_samples: int = field(default=512, metadata=_meta(min=8))


@dataclass
class TrainConfig:
    """The training budget and optimizer of the base network (methods train in phases of it)."""

    epochs: int = field(default=10, metadata=_meta(min=0))
    batch_size: int = field(default=128, metadata=_meta(min=1))
    optimizer: str = field(default="sgd", metadata=_meta(choices=["sgd", "adam", "adamw"]))
    lr: float = field(default=0.05, metadata=_meta(min_exclusive=0.0))
    momentum: float = field(default=0.9, metadata=_meta(min=0.0, max=1.0))
    nesterov: bool = False
    weight_decay: float = field(default=5e-4, metadata=_meta(min=0.0))
    schedule: str = field(default="cosine", metadata=_meta(choices=["cosine", "step", "constant"]))
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = field(default=0.1, metadata=_meta(min_exclusive=0.0, max=1.0))
    label_smoothing: float = field(default=0.0, metadata=_meta(min=0.0, max=1.0))
    deterministic: bool = False  # CUDA: deterministic kernels, so a rerun on the same GPU model is bit-identical (slower)


@dataclass
class SamplerConfig:
    name: str = field(default="tpe", metadata=_meta(choices=["tpe", "nsga2", "gp", "random"]))
    seed: int | None = None
    options: dict = field(default_factory=dict)


# What ``methods.<name>.data`` may set: how many training images; never the split the methods are compared on.
METHOD_DATA_KEYS = ["train_subset"]
# What ``methods.<name>.early_stopping`` may set: where its trials are ranked; eta and min_trials are the study's.
METHOD_STOPPING_KEYS = ["rungs"]

OBJECTIVES = ["accuracy", "params", "flops", "latency"]


@dataclass
class ConstraintsConfig:
    """Budgets, as Optuna constraints: a trial that breaks one stays in the study, marked infeasible."""

    max_params: int | None = field(default=None, metadata=_meta(min=1))
    max_flops: int | None = field(default=None, metadata=_meta(min=1))
    min_accuracy: float | None = field(default=None, metadata=_meta(min=0.0, max=1.0))


@dataclass
class EarlyStoppingConfig:
    """Successive halving over rungs of trained epochs, by Pareto dominance on (accuracy, non-zeros).

    ``rungs`` count epochs across a method's phases. Unset, they lie 1, 3 and 9
    epochs after the first ``train.epochs`` of a method that compresses the
    study's model: until then its trials are the same dense network (trimming,
    IHT) or have not yet removed what they zeroed (l1/l2, SSS), so a rung would
    rank seeds, not compression. A method that builds its own architecture
    (ThriftyNet) has its size from the first epoch: its default rungs are 1, 3
    and 9. ``methods.<name>.early_stopping.rungs`` sets one method's rungs.

    >>> EarlyStoppingConfig().rungs_for(epochs=6), EarlyStoppingConfig().rungs_for(epochs=3, builds_model=True)
    ([7, 9, 15], [1, 3, 9])
    >>> EarlyStoppingConfig(rungs=[2, 4]).rungs_for(epochs=6)
    [2, 4]
    """

    enabled: bool = False
    rungs: list[int] | None = None
    eta: int = field(default=3, metadata=_meta(min=2))
    min_trials: int = field(default=3, metadata=_meta(min=1))

    def __post_init__(self):
        _check_rungs("early_stopping.rungs", self.rungs)

    def rungs_for(self, *, epochs: int, builds_model: bool = False) -> list[int]:
        """The rungs of a method that trains ``epochs`` epochs before it compresses (or builds its own model)."""
        if self.rungs is not None:
            return list(self.rungs)
        start = 0 if builds_model else epochs
        return [start + 1, start + 3, start + 9]


def _check_rungs(path: str, rungs: list[int] | None) -> None:
    if rungs is not None and (not rungs or any(r < 1 for r in rungs) or sorted(set(rungs)) != rungs):
        raise UsageError(f"{path}: expected increasing epoch counts >= 1, got {rungs!r}")


@dataclass
class ReferencePointConfig:
    """The hypervolume's reference point; unset values default to the uncompressed network's."""

    accuracy: float = field(default=0.0, metadata=_meta(min=0.0, max=1.0))
    params: int | None = field(default=None, metadata=_meta(min=1))
    flops: int | None = field(default=None, metadata=_meta(min=1))
    latency: float | None = field(default=None, metadata=_meta(min_exclusive=0.0))


@dataclass
class RecoveryConfig:
    """Surviving dead workers: heartbeats, retries, and per-epoch trial checkpoints.

    ``heartbeat_interval`` paces both the heartbeat every worker writes into its running trial on
    any storage (:mod:`autoslim.heartbeat`; ``autoslim recover`` reads it) and, on an RDB storage,
    Optuna's own heartbeat, whose ``grace_period`` and ``max_retry`` fail and retry a dead worker's trial."""

    heartbeat_interval: int = field(default=60, metadata=_meta(min=1))
    grace_period: int | None = field(default=None, metadata=_meta(min=1))
    max_retry: int | None = field(default=3, metadata=_meta(min=0))
    checkpoint: bool = True


def _own_section(overrides: dict, method: str, section: str, what: str, *, only: list[str] | None = None,
                 why: str = "") -> dict | None:
    """Pop ``methods.<method>.<section>`` (a method's own settings) from its overrides: a mapping, of the keys
    ``only`` where given; None where the study file does not set it."""
    if section not in overrides:
        return None
    own = overrides.pop(section)
    if not isinstance(own, dict):
        raise UsageError(f"methods.{method}.{section}: expected a mapping of {what}, got {own!r}")
    unknown = [key for key in own if only is not None and key not in only]
    if unknown:
        raise UsageError(f"methods.{method}.{section}.{unknown[0]}: a method may set only {', '.join(only)}; {why}")
    return own


@dataclass
class StudyConfig:
    """Everything a study file says. Paths in it are relative to the study file."""

    name: str = field(default="autoslim", metadata=_meta())
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "lenet5"
    model_kwargs: dict = field(default_factory=dict)
    methods: list | dict = field(default_factory=lambda: ["trimming"])
    train: TrainConfig = field(default_factory=TrainConfig)
    n_trials: int = field(default=10, metadata=_meta(min=1))
    timeout: float | None = field(default=None, metadata=_meta(min_exclusive=0.0))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    storage: str | None = None
    artifact_dir: str | None = None
    device: str = field(default="auto", metadata=_meta(choices=["auto", "cpu", "cuda", "mps"]))
    third_objective: str | None = field(default=None, metadata=_meta(choices=["flops", "latency"]))
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    warm_start: bool = True
    reference_point: ReferencePointConfig = field(default_factory=ReferencePointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    path: Path | None = field(default=None, init=False, repr=False)
    # The checked keys of a method's own ``train:`` (methods.<name>.train), over the study's train section,
    # and of its own ``data:`` (methods.<name>.data: train_subset only, so every method is validated on one split).
    # Kept as overrides, so that a change to the study's sections after loading reaches every method.
    method_train: dict[str, dict] = field(default_factory=dict, init=False, repr=False)
    method_data: dict[str, dict] = field(default_factory=dict, init=False, repr=False)
    # methods.<name>.early_stopping: a method's own rungs
    method_stopping: dict[str, dict] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_study_name(self.name)

    @classmethod
    def from_dict(cls, raw: Any, *, path: Path | None = None) -> "StudyConfig":
        cfg = _build(cls, raw, "")
        cfg.path = path
        if isinstance(cfg.methods, list):
            cfg.methods = {m: {} for m in cfg.methods}
        for m, v in cfg.methods.items():
            if not isinstance(m, str) or not isinstance(v, (dict, type(None))):
                raise UsageError(f"methods.{m}: expected a mapping of parameter overrides, got {v!r}")
        cfg.methods = {m: dict(v or {}) for m, v in cfg.methods.items()}
        for m, overrides in cfg.methods.items():
            own = _own_section(overrides, m, "train", "train settings")
            if own is not None:
                built = _build(TrainConfig, {**dataclasses.asdict(cfg.train), **own}, f"methods.{m}.train")
                cfg.method_train[m] = {k: getattr(built, k) for k in own}
            own = _own_section(overrides, m, "data", "data settings", only=METHOD_DATA_KEYS,
                               why="the dataset and its split are the study's")
            if own is not None:
                built = _build(DataConfig, {**dataclasses.asdict(cfg.data), **own}, f"methods.{m}.data")
                cfg.method_data[m] = {k: getattr(built, k) for k in own}
            own = _own_section(overrides, m, "early_stopping", "early-stopping settings", only=METHOD_STOPPING_KEYS,
                               why="eta and min_trials are the study's")
            if own is not None:
                rungs = _check(f"methods.{m}.early_stopping.rungs", own.get("rungs"), list[int], {})
                _check_rungs(f"methods.{m}.early_stopping.rungs", rungs)
                cfg.method_stopping[m] = {"rungs": rungs}
        if not cfg.methods:
            raise UsageError("methods: expected at least one method")
        base = path.parent if path else Path.cwd()
        if cfg.data.data_dir is not None:
            cfg.data.data_dir = str((base / Path(cfg.data.data_dir).expanduser()).resolve())
        if cfg.artifact_dir is not None:
            cfg.artifact_dir = str((base / Path(cfg.artifact_dir).expanduser()).resolve())
        return cfg

    def train_for(self, method: str) -> TrainConfig:
        """The training settings of ``method``'s trials: the study's ``train``, updated by ``methods.<method>.train``.

        >>> cfg = StudyConfig.from_dict({"methods": {"trimming": {}, "thriftynet": {"train": {"epochs": 12}}},
        ...                              "train": {"epochs": 6, "lr": 0.1}})
        >>> cfg.train_for("trimming").epochs, cfg.train_for("thriftynet").epochs, cfg.train_for("thriftynet").lr
        (6, 12, 0.1)
        """
        return dataclasses.replace(self.train, **self.method_train[method]) if method in self.method_train else self.train

    def data_for(self, method: str) -> DataConfig:
        """The data of ``method``'s trials: the study's ``data``, with ``methods.<method>.data.train_subset``.

        >>> cfg = StudyConfig.from_dict({"data": {"name": "digits", "train_subset": 200},
        ...                              "methods": {"trimming": {}, "thriftynet": {"data": {"train_subset": None}}}})
        >>> cfg.data_for("trimming").train_subset, cfg.data_for("thriftynet").train_subset
        (200, None)
        """
        return dataclasses.replace(self.data, **self.method_data[method]) if method in self.method_data else self.data

    def rungs_for(self, method: str) -> list[int]:
        """The early-stopping rungs of ``method``'s trials, in epochs across its phases.

        ``methods.<method>.early_stopping.rungs``, else ``early_stopping.rungs``, else the defaults of
        :meth:`EarlyStoppingConfig.rungs_for` for the method's own ``train.epochs``.

        >>> cfg = StudyConfig.from_dict({"methods": {"trimming": {}, "thriftynet": {"train": {"epochs": 3}},
        ...                                          "l1l2": {"early_stopping": {"rungs": [8]}}},
        ...                              "train": {"epochs": 6}})
        >>> cfg.rungs_for("trimming"), cfg.rungs_for("thriftynet"), cfg.rungs_for("l1l2")
        ([7, 9, 15], [1, 3, 9], [8])
        """
        from autoslim.methods import get_method

        if method in self.method_stopping:
            return list(self.method_stopping[method]["rungs"])
        return self.early_stopping.rungs_for(epochs=self.train_for(method).epochs,
                                             builds_model=get_method(method).builds_model)

    @property
    def objectives(self) -> list[str]:
        return ["accuracy", "params"] + ([self.third_objective] if self.third_objective else [])

    def default_storage(self) -> str:
        """``sqlite:///<name>.db`` beside the study file (or in the working directory)."""
        base = self.path.parent if self.path else Path.cwd()
        return f"sqlite:///{(base / f'{check_study_name(self.name)}.db').resolve()}"


def load_yaml(path: str | Path, what: str = "study file") -> dict:
    """Read a YAML mapping, turning every problem into one UsageError line."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{what}: {path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{what}: {path}: expected a YAML mapping at the top level")
    return raw


def load_study(path: str | Path) -> StudyConfig:
    """Load and validate a study file (names of data, model and methods are checked too)."""
    p = Path(path)
    raw = load_yaml(p)
    if "name" not in raw:
        raw["name"] = check_study_name(p.stem, field=f"name (unset, so the study file's name {p.name!r})")
    cfg = StudyConfig.from_dict(raw, path=p.resolve())
    validate_names(cfg)
    return cfg


def _check_data_and_model(data: str, model: str) -> None:
    from autoslim.data import list_datasets
    from autoslim.errors import accepted
    from autoslim.models import list_models

    if data not in list_datasets():
        raise accepted("data.name", data, list_datasets())
    if model not in list_models():
        raise accepted("model", model, list_models())


def validate_names(cfg: StudyConfig) -> None:
    """Check registry names and method overrides before anything runs or is stored."""
    from autoslim.errors import accepted
    from autoslim.methods import get_method, list_methods

    _check_data_and_model(cfg.data.name, cfg.model)
    for name, overrides in cfg.methods.items():
        if name not in list_methods():
            raise accepted("methods", name, list_methods())
        get_method(name).search_space().narrow(overrides, where=f"methods.{name}")


# What a trial's config.yaml must hold (autoslim export writes every field); params left out are filled in.
TRIAL_KEYS = ["method", "model", "data", "train", "seed"]


@dataclass
class TrialConfig:
    """One trial's full configuration: enough to rebuild and retrain its network.

    >>> t = TrialConfig(method="trimming", params={"rounds": 1}, model="lenet5")
    >>> TrialConfig.from_dict(t.to_dict()) == t
    True
    >>> full, filled = t.checked()
    >>> full.params["rounds"], filled["rule"], "rounds" in filled
    (1, 'std', False)
    """

    method: str
    params: dict = field(default_factory=dict)
    model: str = "lenet5"
    model_kwargs: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrialConfig":
        """Built from a mapping, every key and value type-checked (names and params: :meth:`checked`)."""
        return _build(cls, raw, "")

    @classmethod
    def load(cls, path: str | Path) -> "TrialConfig":
        """A trial's ``config.yaml`` (``autoslim export`` writes it), refused in one line if it lacks a section
        of a trial (:data:`TRIAL_KEYS`) or if the study would refuse it (:meth:`checked`)."""
        raw = load_yaml(path, "config file")
        missing = [key for key in TRIAL_KEYS if key not in raw]
        if missing:
            raise UsageError(f"config file: {path} has no {missing[0]!r}; accepted: a trial's config.yaml with "
                             f"{', '.join(TRIAL_KEYS)} (and params, model_kwargs, device), as autoslim export "
                             "writes it")
        config = cls.from_dict(raw)
        config.checked()
        return config

    def checked(self) -> tuple["TrialConfig", dict]:
        """This config as a study checks a trial's, with the method's parameters it leaves out filled in from
        the method's search space; and the parameters so filled (empty for a trial a study sampled).

        The method, model and data names must be registered; every parameter must be one of the method's
        and in its range (``params.<name>``: the UsageError line of a study file's override)."""
        from autoslim.methods import get_method

        method = get_method(self.method)
        _check_data_and_model(self.data.name, self.model)
        if not isinstance(self.params, dict):
            raise UsageError(f"params: expected a mapping of {self.method}'s parameters, got {self.params!r}")
        params = method.search_space().complete(self.params, where="params")
        return dataclasses.replace(self, params=params), {k: v for k, v in params.items() if k not in self.params}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
