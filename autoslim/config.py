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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoslim.errors import UsageError
from autoslim.schema import build, check, meta


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


def artifact_location(location: str | None, *, base: Path, field: str = "artifact_store") -> str | None:
    """An artifact store's location as given in a study file or flag: an ``s3://bucket[/prefix]`` URL as it is,
    a folder resolved against ``base``; any other URL is a UsageError naming ``field``.

    >>> artifact_location("s3://bucket/runs/x", base=Path("/s")), artifact_location("art", base=Path("/s"))
    ('s3://bucket/runs/x', '/s/art')
    """
    if location is None:
        return None
    if location.startswith("s3://"):
        if not location[len("s3://"):].split("/")[0]:
            raise UsageError(f"{field}: {location!r} names no bucket; accepted: s3://BUCKET[/PREFIX]")
        return location
    if "://" in location:
        raise UsageError(f"{field}: {location!r} is not a folder or an s3:// URL; accepted: a folder, "
                         "s3://BUCKET[/PREFIX]")
    return str((base / Path(location).expanduser()).resolve())


@dataclass
class DataConfig:
    """Which data to train on and how it is split."""

    name: str = "digits"
    data_dir: str | None = None
    download: bool = True
    val_fraction: float = field(default=0.15, metadata=meta(min_exclusive=0.0, max=0.9))
    test_fraction: float = field(default=0.2, metadata=meta(min_exclusive=0.0, max=0.9))
    train_subset: int | float | None = field(default=None, metadata=meta(min_exclusive=0, count_or_fraction=True))
    test_subset: int | None = field(default=None, metadata=meta(min=1))
    augment: bool | None = None
    seed: int = 0
    image_size: int | None = field(default=None, metadata=meta(min=4))
    # imagefolder: read batches through a DataLoader instead of loading every image into memory (None: when the
    # folder holds more than autoslim.data.STREAM_ABOVE images); its worker processes
    stream: bool | None = None
    workers: int = field(default=2, metadata=meta(min=0))
    # synthetic data only
    image_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    num_classes: int = field(default=4, metadata=meta(min=2))
    num_samples: int = field(default=512, metadata=meta(min=8))


@dataclass
class TrainConfig:
    """The training budget and optimizer of the base network (methods train in phases of it)."""

    epochs: int = field(default=10, metadata=meta(min=0))
    batch_size: int = field(default=128, metadata=meta(min=1))
    optimizer: str = field(default="sgd", metadata=meta(choices=["sgd", "adam", "adamw"]))
    lr: float = field(default=0.05, metadata=meta(min_exclusive=0.0))
    momentum: float = field(default=0.9, metadata=meta(min=0.0, max=1.0))
    nesterov: bool = False
    weight_decay: float = field(default=5e-4, metadata=meta(min=0.0))
    schedule: str = field(default="cosine", metadata=meta(choices=["cosine", "step", "constant"]))
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = field(default=0.1, metadata=meta(min_exclusive=0.0, max=1.0))
    label_smoothing: float = field(default=0.0, metadata=meta(min=0.0, max=1.0))
    deterministic: bool = False  # CUDA: deterministic kernels, so a rerun on the same GPU model is bit-identical (slower)
    # The user's training function and metric, as import strings 'package.module:name' (autoslim.fit); None: autoslim's
    fit: str | None = None
    evaluate: str | None = None


@dataclass
class SamplerConfig:
    name: str = field(default="tpe", metadata=meta(choices=["tpe", "nsga2", "gp", "random"]))
    seed: int | None = None
    options: dict = field(default_factory=dict)


# What ``methods.<name>.data`` may set: how many training images; never the split the methods are compared on.
METHOD_DATA_KEYS = ["train_subset"]
# What ``methods.<name>.early_stopping`` may set: where its trials are ranked; eta and min_trials are the study's.
METHOD_STOPPING_KEYS = ["rungs"]

OBJECTIVES = ["accuracy", "params", "flops", "latency"]
# What ``model_adapt`` may change in a model that does not fit the data (autoslim.models.adapt).
MODEL_ADAPT = ["in_channels", "num_classes"]


def check_model_adapt(value: list[str]) -> list[str]:
    """``model_adapt``: a list of :data:`MODEL_ADAPT` entries (the schema has checked it is a list of strings)."""
    if not isinstance(value, list):
        raise UsageError(f"model_adapt: expected a list, got {value!r}")
    for i, item in enumerate(value):
        if item not in MODEL_ADAPT:
            raise UsageError(f"model_adapt[{i}]: unknown value {item!r}; accepted: {', '.join(MODEL_ADAPT)}")
    return value


@dataclass
class PruningConfig:
    """What every structured method (trimming, l1l2, sss) may remove, whatever its own rule says
    (:mod:`autoslim.selection`).

    ``ignore``: layers never pruned, as qualified module names or glob patterns
    (``classifier.*``); a name also covers the layers inside it (``layer4``).
    An ignored layer keeps its output channels, and so does every layer tied
    to it (a residual stream); its inputs follow the layer before it.
    ``round_to``: the width of every pruned group is rounded up to a multiple
    of it (1: off), never above the group's width; a group narrower than the
    multiple keeps all its channels.

    >>> PruningConfig(ignore=["classifier.*"], round_to=8).round_to
    8
    """

    ignore: list[str] = field(default_factory=list)
    round_to: int = field(default=1, metadata=meta(min=1))

    def __post_init__(self):
        if any(not isinstance(p, str) or not p for p in self.ignore):
            bad = next(p for p in self.ignore if not isinstance(p, str) or not p)
            raise UsageError(f"pruning.ignore: expected module names or glob patterns, got {bad!r}")

    @property
    def active(self) -> bool:
        return bool(self.ignore) or self.round_to > 1


@dataclass
class BaseConfig:
    """Where a trial's trained network comes from before a method compresses it (the study file's ``base:``).

    Trimming and IHT compress a trained network; l1/l2 and SSS do with ``start: base``. By default
    (``share: true``) it is trained once per study, with the study's ``seed``, and shared by every trial and
    worker that trains the same model on the same data with the same ``train`` (:mod:`autoslim.basenet`).
    ``weights``: a state dict file (a path relative to the study file) to start from instead, nothing trained;
    ``train: false``: the model factory already loads trained weights (e.g. torchvision's ``weights=``), nothing
    trained; ``share: false``: every trial trains its own (as before). In a trial's config, ``seed`` is the seed the
    shared base was trained with (null in a study file: the study's ``seed``).

    >>> BaseConfig()
    BaseConfig(share=True, train=True, weights=None, seed=None)
    """

    share: bool = True
    train: bool = True
    weights: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and not self.train:
            raise UsageError("base.train: false says the model factory loads trained weights, base.weights gives a "
                             "file of them; accepted: one of the two")

    @property
    def in_trial(self) -> bool:
        """Whether each trial trains its own base (``share: false``, no ``weights``, ``train: true``)."""
        return not self.share and self.weights is None and self.train


@dataclass
class ConstraintsConfig:
    """Budgets, as Optuna constraints: a trial that breaks one stays in the study, marked infeasible."""

    max_params: int | None = field(default=None, metadata=meta(min=1))
    max_flops: int | None = field(default=None, metadata=meta(min=1))
    min_accuracy: float | None = field(default=None, metadata=meta(min=0.0, max=1.0))


REMOVALS = ["target", "threshold", "both"]


@dataclass
class TargetConfig:
    """How a trial's size is decided (the study file's ``target:`` section).

    ``removal``: ``target``, every trial removes down to a size sampled for it
    (its Optuna parameter ``target_params``, or ``target_flops``), log-uniform
    from ``low`` to ``high`` times the study's budget, each method by its own
    importance order (the knobs that decide size under the paper's rule,
    ``Method.size_knobs``, are then not sampled); ``threshold``, each method's
    own stopping rule (the papers'); ``both``, the categorical Optuna parameter
    ``removal`` picks one per trial. Unset: ``target`` when the study sets
    ``constraints.max_params`` or ``max_flops``, else ``threshold``. The budget
    is ``max_params`` when it is set (a target in parameters), else
    ``max_flops`` (a target in FLOPs).

    >>> budgeted, free = ConstraintsConfig(max_params=10_000), ConstraintsConfig()
    >>> TargetConfig().removal_for(budgeted), TargetConfig().removal_for(free)
    ('target', 'threshold')
    >>> TargetConfig(low=0.5, high=0.1)
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: target.low: 0.5 is above target.high 0.1; accepted: 0 < low <= high <= 1
    """

    removal: str | None = field(default=None, metadata=meta(choices=REMOVALS))
    low: float = field(default=0.05, metadata=meta(min_exclusive=0.0, max=1.0))
    high: float = field(default=1.0, metadata=meta(min_exclusive=0.0, max=1.0))

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise UsageError(f"target.low: {self.low} is above target.high {self.high}; accepted: "
                             "0 < low <= high <= 1")

    def removal_for(self, constraints: "ConstraintsConfig") -> str:
        """The removal rule of a study with ``constraints``; a UsageError line if it needs a budget there is not."""
        if self.removal is None:
            return "target" if budget(constraints) else "threshold"
        if self.removal != "threshold" and not budget(constraints):
            raise UsageError(f"target.removal: {self.removal!r} samples a size under the study's budget, and the "
                             "study sets none; accepted: set constraints.max_params or constraints.max_flops, or "
                             "removal: threshold")
        return self.removal


def budget(constraints: "ConstraintsConfig") -> tuple[str, int] | None:
    """The study's size budget as (measure, value): ``max_params`` where set, else ``max_flops``; None: neither.

    >>> budget(ConstraintsConfig(max_params=10, max_flops=99)), budget(ConstraintsConfig())
    (('params', 10), None)
    """
    if constraints.max_params is not None:
        return "params", constraints.max_params
    if constraints.max_flops is not None:
        return "flops", constraints.max_flops
    return None


@dataclass
class TrialTarget:
    """The size a trial's method removes down to (``value`` parameters or FLOPs, ``measure``), recorded in its
    config: ``rule: target`` removes down to it in the method's importance order; ``rule: cap`` applies the
    method's own rule and goes on down to it only where that rule leaves more (a warm-start trial under a
    budget)."""

    measure: str = field(default="params", metadata=meta(choices=["params", "flops"]))
    value: int = field(default=0, metadata=meta(min=0))
    rule: str = field(default="target", metadata=meta(choices=["target", "cap"]))


@dataclass
class EarlyStoppingConfig:
    """Successive halving over rungs of trained epochs, by Pareto dominance on (accuracy, non-zeros).

    ``rungs`` count the epochs a trial trains, across its method's phases:
    increasing positive numbers; a fraction lies inside an epoch (0.25: after a
    quarter of the first epoch's training batches, 2.5: half-way through the
    third). Unset, they lie 1, 3 and 9 epochs after the epochs a trial trains
    before it removes anything: the base network's ``train.epochs`` where each
    trial trains its own (``base: {share: false}``; a shared base is trained
    outside the trials), and the ``train.epochs`` of l1/l2's and SSS's
    regularized training. Until then its trials are the same dense network or
    have not yet removed what they zeroed, so a rung would rank seeds, not
    compression. A method that builds its own architecture (ThriftyNet) has its
    size from the first step, and its epochs are long (its published setting
    trains 3 epochs of a deep recurrent network), so its first rung comes a
    quarter into the first epoch, where a rung costs a quarter of an epoch
    rather than one: 0.25, 1 and 3. ``methods.<name>.early_stopping.rungs`` sets
    one method's rungs (:func:`autoslim.search.halving.rungs_for`).

    >>> EarlyStoppingConfig().rungs_for(epochs=6), EarlyStoppingConfig().rungs_for(epochs=3, builds_model=True)
    ([7, 9, 15], [0.25, 1, 3])
    >>> EarlyStoppingConfig(rungs=[0.5, 2, 4.0]).rungs_for(epochs=6)
    [0.5, 2, 4]
    """

    enabled: bool = False
    rungs: list[float] | None = None
    eta: int = field(default=3, metadata=meta(min=2))
    min_trials: int = field(default=3, metadata=meta(min=1))

    def __post_init__(self):
        self.rungs = _check_rungs("early_stopping.rungs", self.rungs)

    def rungs_for(self, *, epochs: int, builds_model: bool = False) -> list[float]:
        """The rungs of a trial that trains ``epochs`` epochs before it removes anything (or builds its own model)."""
        if self.rungs is not None:
            return list(self.rungs)
        if builds_model:
            return [0.25, 1, 3]
        return [epochs + 1, epochs + 3, epochs + 9]


def _check_rungs(path: str, rungs: list[float] | None) -> list[float] | None:
    """``rungs`` checked (increasing positive numbers), whole ones as ints; a UsageError line otherwise.

    >>> _check_rungs("early_stopping.rungs", [0.5, 1.0, 3])
    [0.5, 1, 3]
    >>> _check_rungs("early_stopping.rungs", [1, 0.5])
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: early_stopping.rungs: expected increasing positive numbers of epochs (0.25: a quarter into the first epoch), got [1, 0.5]
    """
    if rungs is None:
        return None
    ok = bool(rungs) and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < float("inf")
                             for r in rungs)
    if not ok or any(b <= a for a, b in zip(rungs, rungs[1:])):
        shown = [int(r) if isinstance(r, float) and r.is_integer() else r for r in rungs]
        raise UsageError(f"{path}: expected increasing positive numbers of epochs (0.25: a quarter into the first "
                         f"epoch), got {shown!r}")
    return [int(r) if float(r).is_integer() else float(r) for r in rungs]


@dataclass
class ReferencePointConfig:
    """The hypervolume's reference point; unset values default to the uncompressed network's."""

    accuracy: float = field(default=0.0, metadata=meta(min=0.0, max=1.0))
    params: int | None = field(default=None, metadata=meta(min=1))
    flops: int | None = field(default=None, metadata=meta(min=1))
    latency: float | None = field(default=None, metadata=meta(min_exclusive=0.0))


@dataclass
class LatencyConfig:
    """How a trial's latency is measured (:func:`autoslim.measure.latency`): a forward pass of ``batch_size``
    inputs on ``device`` (``cpu``, or ``study``: the device the trial trained on), in PyTorch or in ONNX Runtime
    (``runtime: onnxruntime``, on the CPU), with ``threads`` threads (null: the runtime's default), timed in
    blocks that take ``time`` seconds in all after warm-up calls.

    >>> LatencyConfig()
    LatencyConfig(batch_size=1, device='cpu', runtime='torch', threads=1, time=0.05)
    """

    batch_size: int = field(default=1, metadata=meta(min=1))
    device: str = field(default="cpu", metadata=meta(choices=["cpu", "study"]))
    runtime: str = field(default="torch", metadata=meta(choices=["torch", "onnxruntime"]))
    threads: int | None = field(default=1, metadata=meta(min=1))
    time: float = field(default=0.05, metadata=meta(min_exclusive=0.0))

    def __post_init__(self) -> None:
        if self.runtime == "onnxruntime" and self.device != "cpu":
            raise UsageError("latency.device: onnxruntime is measured on the CPU; accepted with it: cpu")


@dataclass
class RecoveryConfig:
    """Surviving dead workers: heartbeats, retries, and per-epoch trial checkpoints.

    ``heartbeat_interval`` paces the heartbeat every worker writes into its running trial on any
    storage (:mod:`autoslim.heartbeat`); a trial silent for ``grace_period`` seconds (default: twice
    the interval) is failed and retried by the other workers (:mod:`autoslim.distributed`), at most
    ``max_retry`` times (then a fresh trial takes its place); ``autoslim recover`` reads the same signal."""

    heartbeat_interval: int = field(default=60, metadata=meta(min=1))
    grace_period: int | None = field(default=None, metadata=meta(min=1))
    max_retry: int | None = field(default=3, metadata=meta(min=0))
    checkpoint: bool = True


@dataclass
class MethodConfig:
    """A method's section of a study file: overrides of its search space, and its own train, data and rungs.

    ``space`` maps a knob to a scalar (pinned) or a mapping (``low``/``high``/``log``/``step``, ``choices``,
    ``default``), checked against the method's space when the study starts. ``train`` holds the checked keys
    of ``methods.<name>.train`` that update the study's ``train`` for this method's trials; ``data`` those of
    ``methods.<name>.data`` (``train_subset`` only: every method is validated and tested on one split);
    ``rungs`` its early-stopping rungs (None: the study's). The study's sections stay the base, so a later
    change to them reaches every method.

    >>> MethodConfig.from_dict({"rounds": 2, "train": {"epochs": 3}}, method="trimming", study_train=TrainConfig(),
    ...                        study_data=DataConfig())
    MethodConfig(space={'rounds': 2}, train={'epochs': 3}, data={}, rungs=None)
    """

    space: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    rungs: list[float] | None = None

    @classmethod
    def from_dict(cls, raw: Any, *, method: str, study_train: "TrainConfig", study_data: "DataConfig") -> "MethodConfig":
        """Split ``methods.<method>`` of a study file into its sections, each checked."""
        where = f"methods.{method}"
        if not isinstance(raw, (dict, type(None))):
            raise UsageError(f"{where}: expected a mapping of parameter overrides, got {raw!r}")
        space = dict(raw or {})
        train = _section(space, where, "train", "train settings")
        data = _section(space, where, "data", "data settings", only=METHOD_DATA_KEYS,
                        why="the dataset and its split are the study's")
        stopping = _section(space, where, "early_stopping", "early-stopping settings", only=METHOD_STOPPING_KEYS,
                            why="eta and min_trials are the study's")
        built = build(TrainConfig, {**dataclasses.asdict(study_train), **train}, f"{where}.train")
        built_data = build(DataConfig, {**dataclasses.asdict(study_data), **data}, f"{where}.data")
        rungs = None
        if "rungs" in stopping:
            rungs = _check_rungs(f"{where}.early_stopping.rungs",
                                 check(f"{where}.early_stopping.rungs", stopping["rungs"], list[float], {}))
        return cls(space=space, train={k: getattr(built, k) for k in train},
                   data={k: getattr(built_data, k) for k in data}, rungs=rungs)

    def to_dict(self) -> dict:
        """The section as a study file writes it."""
        own = {"train": self.train, "data": self.data, "early_stopping": {"rungs": self.rungs} if self.rungs else {}}
        return {**self.space, **{k: v for k, v in own.items() if v}}


def _section(overrides: dict, where: str, section: str, what: str, *, only: list[str] | None = None,
             why: str = "") -> dict:
    """Pop ``<where>.<section>`` from a method's overrides: a mapping, of the keys ``only`` where given."""
    own = overrides.pop(section, {})
    if not isinstance(own, dict):
        raise UsageError(f"{where}.{section}: expected a mapping of {what}, got {own!r}")
    unknown = [key for key in own if only is not None and key not in only]
    if unknown:
        raise UsageError(f"{where}.{section}.{unknown[0]}: a method may set only {', '.join(only)}; {why}")
    return own


@dataclass
class StudyConfig:
    """Everything a study file says. Paths in it are relative to the study file."""

    name: str = field(default="autoslim", metadata=meta())
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "lenet5"
    model_kwargs: dict = field(default_factory=dict)
    model_adapt: list[str] = field(default_factory=list)  # MODEL_ADAPT: what autoslim may fit to the data
    methods: list | dict = field(default_factory=lambda: ["trimming"])  # after loading: {name: MethodConfig}
    train: TrainConfig = field(default_factory=TrainConfig)
    n_trials: int = field(default=10, metadata=meta(min=1))
    timeout: float | None = field(default=None, metadata=meta(min_exclusive=0.0))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    storage: str | None = None
    artifact_dir: str | None = None  # the older name of artifact_store, for a folder
    artifact_store: str | None = None  # a folder, or s3://bucket/prefix (autoslim.storage.open_artifact_store)
    device: str = field(default="auto", metadata=meta(choices=["auto", "cpu", "cuda", "mps"]))
    third_objective: str | None = field(default=None, metadata=meta(choices=["flops", "latency"]))
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    target: TargetConfig = field(default_factory=TargetConfig)  # how a trial's size is decided
    pruning: PruningConfig = field(default_factory=PruningConfig)  # for the structured methods
    base: BaseConfig = field(default_factory=BaseConfig)  # the trained network compression starts from
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    warm_start: bool = True
    # A trial of a method that compresses the study's model but removed nothing: pruned (its sampled knobs rank
    # as bad, its full-size accuracy stays off the front) or kept (completed, marked by user attr nothing_removed).
    nothing_removed: str = field(default="prune", metadata=meta(choices=["prune", "keep"]))
    reference_point: ReferencePointConfig = field(default_factory=ReferencePointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    path: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_study_name(self.name)
        check_model_adapt(self.model_adapt)

    @classmethod
    def from_dict(cls, raw: Any, *, path: Path | None = None) -> "StudyConfig":
        """A study file's mapping, every key and value checked (names are checked by the registries when the
        study runs, :func:`autoslim.study.check_study`); ``methods`` becomes {name: :class:`MethodConfig`}."""
        cfg = build(cls, raw, "")
        cfg.path = path
        methods = {m: None for m in cfg.methods} if isinstance(cfg.methods, list) else cfg.methods
        for m in methods:
            if not isinstance(m, str):
                raise UsageError(f"methods: expected method names, got {m!r}")
        cfg.methods = {m: v if isinstance(v, MethodConfig) else
                       MethodConfig.from_dict(v, method=m, study_train=cfg.train, study_data=cfg.data)
                       for m, v in methods.items()}
        if not cfg.methods:
            raise UsageError("methods: expected at least one method")
        base = path.parent if path else Path.cwd()
        if cfg.data.data_dir is not None:
            cfg.data.data_dir = str((base / Path(cfg.data.data_dir).expanduser()).resolve())
        if cfg.artifact_dir is not None and cfg.artifact_store is not None:
            raise UsageError("artifact_store: give artifact_store or artifact_dir (its older name, for a folder), "
                             "not both")
        if cfg.artifact_dir is not None:
            cfg.artifact_dir = str((base / Path(cfg.artifact_dir).expanduser()).resolve())
        cfg.artifact_store = artifact_location(cfg.artifact_store or cfg.artifact_dir, base=base)
        cfg.target.removal_for(cfg.constraints)  # refuses a removal rule that needs a budget the study lacks
        if cfg.base.weights is not None:
            cfg.base.weights = str((base / Path(cfg.base.weights).expanduser()).resolve())
        return cfg

    def to_dict(self) -> dict:
        """The study as a study file says it (what ``autoslim_config`` holds in the storage).

        >>> StudyConfig.from_dict({"methods": {"trimming": {"rounds": 2, "train": {"epochs": 1}}}}).to_dict()["methods"]
        {'trimming': {'rounds': 2, 'train': {'epochs': 1}}}
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        d["methods"] = {m: c.to_dict() for m, c in self.methods.items()}
        return d

    def base_for_trial(self) -> BaseConfig:
        """The study's ``base`` as a trial's config records it: the seed a shared base is trained with set.

        >>> StudyConfig.from_dict({"seed": 3}).base_for_trial()
        BaseConfig(share=True, train=True, weights=None, seed=3)
        """
        return dataclasses.replace(self.base, seed=self.seed if self.base.seed is None else self.base.seed)

    def train_for(self, method: str) -> TrainConfig:
        """The training settings of ``method``'s trials: the study's ``train``, updated by ``methods.<method>.train``.

        >>> cfg = StudyConfig.from_dict({"methods": {"trimming": {}, "thriftynet": {"train": {"epochs": 12}}},
        ...                              "train": {"epochs": 6, "lr": 0.1}})
        >>> cfg.train_for("trimming").epochs, cfg.train_for("thriftynet").epochs, cfg.train_for("thriftynet").lr
        (6, 12, 0.1)
        """
        return dataclasses.replace(self.train, **self.methods[method].train)

    def data_for(self, method: str) -> DataConfig:
        """The data of ``method``'s trials: the study's ``data``, with ``methods.<method>.data.train_subset``.

        >>> cfg = StudyConfig.from_dict({"data": {"name": "digits", "train_subset": 200},
        ...                              "methods": {"trimming": {}, "thriftynet": {"data": {"train_subset": None}}}})
        >>> cfg.data_for("trimming").train_subset, cfg.data_for("thriftynet").train_subset
        (200, None)
        """
        return dataclasses.replace(self.data, **self.methods[method].data)

    @property
    def removal(self) -> str:
        """The study's removal rule: ``target``, ``threshold`` or ``both`` (:class:`TargetConfig`)."""
        return self.target.removal_for(self.constraints)

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
    """Load a study file, every key and value checked (registry names are checked when it runs:
    :func:`autoslim.study.check_study`)."""
    p = Path(path)
    raw = load_yaml(p)
    if "name" not in raw:
        raw["name"] = check_study_name(p.stem, field=f"name (unset, so the study file's name {p.name!r})")
    return StudyConfig.from_dict(raw, path=p.resolve())


@dataclass
class TrialConfig:
    """One trial's full configuration: enough to rebuild and retrain its network.

    >>> t = TrialConfig(method="trimming", params={"rounds": 1}, model="lenet5")
    >>> TrialConfig.from_dict(t.to_dict()) == t
    True
    """

    method: str
    params: dict = field(default_factory=dict)
    model: str = "lenet5"
    model_kwargs: dict = field(default_factory=dict)
    model_adapt: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    target: TrialTarget | None = None  # None: the method's own rule decides the size (older configs lack it)
    #: How the trained network the method starts from is obtained; unset (a config written before there was a
    #: shared base): the trial trains its own.
    base: BaseConfig = field(default_factory=lambda: BaseConfig(share=False))

    def __post_init__(self) -> None:
        check_model_adapt(self.model_adapt)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrialConfig":
        """Built from a mapping, every key and value type-checked (names and params:
        :func:`autoslim.trial.check_trial_config`)."""
        return build(cls, raw, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
