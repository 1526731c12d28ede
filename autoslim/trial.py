"""One trial, end to end: config -> checked config -> model -> method -> measurements.

:func:`run_trial` is independent of Optuna (``autoslim train`` and ``export
--retrain`` use it; :class:`autoslim.search.objective.Objective` wraps it for a
study). A trial's :class:`~autoslim.config.TrialConfig` names a method, a model and a
data set (checked against their registries) and the method's parameters
(checked against its search space; the ones it leaves out take their
defaults). ``autoslim train`` and :func:`autoslim.run_trial` accept exactly
what a study would have run.

>>> from autoslim.config import TrialConfig
>>> full, filled = check_trial_config(TrialConfig(method="trimming", params={"rounds": 1}, model="lenet5"))
>>> full.params["rounds"], filled["rule"], "rounds" in filled
(1, 'std', False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from autoslim.basenet import BaseNetworks
from autoslim.checkpoint import Checkpointer
from autoslim.config import PruningConfig, TrialConfig, load_yaml
from autoslim.data import DATASETS, Data
from autoslim.errors import UsageError
from autoslim.fit import resolve_loop
from autoslim.measure import Measurements, count_params, layer_density, layer_widths, measure
from autoslim.methods import Method, TrialContext, get_method, list_methods
from autoslim.models import MODELS, create_model
from autoslim.selection import SizeTarget, check_ignore
from autoslim.train import Callback, seed_everything

# What a trial's config.yaml must hold (autoslim export writes every field); params left out are filled in.
TRIAL_KEYS = ["method", "model", "data", "train", "seed"]


def check_trial_config(config: TrialConfig) -> tuple[TrialConfig, dict]:
    """``config`` as a study checks a trial's, with the method's parameters it leaves out filled in from the
    method's search space; and the parameters so filled (empty for a trial a study sampled).

    The method, model and data names must be registered, the user ``train.fit``/``train.evaluate`` importable
    and of the right signature (:func:`autoslim.fit.resolve_loop`); every parameter must be one of the method's and in
    its range (``params.<name>``: the UsageError line of a study file's override); ``pruning`` rules are
    refused for a method that does not remove channels (it would ignore them), a size ``target`` for a method
    that cannot reach one of its measure (:attr:`autoslim.methods.Method.target_measures`); a method whose knob
    is its size gets it from the target (:meth:`autoslim.methods.Method.with_target`)."""
    method = get_method(config.method)
    if config.pruning.active and not method.structured:
        raise UsageError(f"pruning: method {config.method!r} does not remove channels, so ignore and round_to do not "
                         f"apply to it; accepted: a method that does ({', '.join(structured_methods())})")
    DATASETS.get(config.data.name)
    MODELS.get(config.model)
    resolve_loop(config.train)
    if not isinstance(config.params, dict):
        raise UsageError(f"params: expected a mapping of {config.method}'s parameters, got {config.params!r}")
    params = method.search_space().complete(config.params, where="params")
    filled = {k: v for k, v in params.items() if k not in config.params}
    target = size_target(config)
    if target is not None:
        if target.measure not in method.target_measures:
            can = [m for m in list_methods() if target.measure in get_method(m).target_measures]
            raise UsageError(f"target: method {config.method!r} cannot remove down to a {target.measure} target; "
                             f"accepted: target: null, or a method that can ({', '.join(can)})")
        params = method.with_target(params, target)
    return dataclasses.replace(config, params=params), filled


def size_target(config: TrialConfig) -> SizeTarget | None:
    """The :class:`~autoslim.selection.SizeTarget` a trial's method is handed (``config.target``), or None."""
    t = config.target
    return None if t is None else SizeTarget(t.value, t.measure, cap=t.rule == "cap")


def load_trial_config(path: str | Path) -> TrialConfig:
    """A trial's ``config.yaml`` (``autoslim export`` writes it), refused in one line if it lacks a section of a
    trial (:data:`TRIAL_KEYS`) or if the study would refuse it (:func:`check_trial_config`)."""
    raw = load_yaml(path, "config file")
    if not isinstance(raw.pop("input", {}), dict):  # what the model expects: information for users, not a setting
        raise UsageError(f"config file: {path}: input must be a mapping (shape, mean, std, classes), as autoslim "
                         "export writes it")
    missing = [key for key in TRIAL_KEYS if key not in raw]
    if missing:
        raise UsageError(f"config file: {path} has no {missing[0]!r}; accepted: a trial's config.yaml with "
                         f"{', '.join(TRIAL_KEYS)} (and params, model_kwargs, model_adapt, device, input, pruning, "
                         "target, base), as autoslim export writes it")
    config = TrialConfig.from_dict(raw)
    check_trial_config(config)
    return config


CHECK_EXAMPLES = 8  # validation images a method's check runs the untrained model on


def structured_methods() -> list[str]:
    """The registered methods that remove channels (and so honour the study's ``pruning:`` rules)."""
    return [m for m in list_methods() if get_method(m).structured]


def check_method(method: Method, model: nn.Module, *, example_input, params, pruning: PruningConfig) -> None:
    """``method.check``, handed the ``pruning`` rules if it is structured (a method that is not may not take
    them); for a structured method, first an ``ignore`` pattern that matches no layer of ``model`` is refused
    (:func:`autoslim.selection.check_ignore`), whoever wrote the method."""
    if method.structured:
        check_ignore(model, pruning)
    method.check(model, example_input=example_input, params=params,
                 **({"pruning": pruning} if method.structured else {}))


@dataclass
class TrialResult:
    """Everything a trial measured; ``user_attrs()`` is what the study stores."""

    config: TrialConfig
    model: nn.Module
    val_accuracy: float
    test_accuracy: float
    measurements: Measurements
    baseline_params: int
    sparse: bool
    widths_before: dict
    widths_after: dict
    history: list
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    nothing_removed: str | None = None  # why the trial counts as "removed nothing" (None: it compressed)
    in_shape: tuple = ()  # of one input, and the classes (outputs): what the model file records
    num_classes: int = 0
    input_spec: dict = field(default_factory=dict)  # what the model expects: Data.input_spec()

    @property
    def params(self) -> int:
        """The parameter objective: non-zeros for unstructured sparsity, else dense parameters."""
        return self.measurements.nonzeros if self.sparse else self.measurements.params

    def objective(self, name: str) -> float:
        return {"accuracy": self.val_accuracy, "params": self.params, "flops": self.measurements.flops,
                "latency": self.measurements.latency_ms}[name]

    def user_attrs(self) -> dict:
        m = self.measurements
        return {
            "config": self.config.to_dict(), "method": self.config.method,
            "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
            "params": m.params, "nonzeros": m.nonzeros, "flops": m.flops, "latency_ms": m.latency_ms,
            "latency_iqr_ms": m.latency_iqr_ms,
            "size_bytes": m.size_bytes, "sparse": self.sparse, "baseline_params": self.baseline_params,
            "compression": self.baseline_params / max(1, self.params),
            "widths_before": self.widths_before, "widths_after": self.widths_after,
            "history": self.history, "info": self.info, "seconds": self.seconds,
            **({"nothing_removed": self.nothing_removed} if self.nothing_removed else {}),
        }


def build_model(config: TrialConfig, *, in_shape, num_classes: int) -> nn.Module:
    """The uncompressed network of a trial: the study's model, or the method's own architecture."""
    method = get_method(config.method)
    if method.builds_model:
        return method.build_model(config.params, in_shape=in_shape, num_classes=num_classes)
    return create_model(config.model, in_shape=in_shape, num_classes=num_classes, adapt=config.model_adapt,
                        **config.model_kwargs)


def run_trial(config: TrialConfig, *, data: Data, callbacks: Sequence[Callback] = (),
              log: Callable[[str], None] = lambda s: None, checkpointer: Checkpointer | None = None,
              bases: BaseNetworks | None = None) -> TrialResult:
    """Build, check, train and compress the network of ``config`` on ``data``; measure the result.

    ``config`` is checked as a study checks a trial (:func:`autoslim.trial.check_trial_config`); the
    method's parameters it leaves out take their search-space defaults, logged and
    recorded in ``info["filled_params"]`` (the result's ``config`` holds them all).
    The method checks the untrained model first (:meth:`autoslim.methods.Method.check`): a model it cannot
    compress is refused (UsageError) before any epoch. A method that compresses the study's model but left
    as many parameters (non-zeros for a sparse result) as it started with is marked: ``nothing_removed``
    holds the reason, which is also logged.
    ``checkpointer`` (:class:`autoslim.checkpoint.Checkpointer`) checkpoints every epoch and resumes.
    ``config.train.fit``/``evaluate`` (import strings) train every phase with the user's loop and score with the
    user's metric (:mod:`autoslim.fit`).
    A method that starts from a trained network gets it as ``config.base`` says (:mod:`autoslim.basenet`): from
    ``bases`` (a study's shared bases; None: a shared base is trained in this call), the user's weights, the
    model factory's, or trained in the trial; ``info["base"]`` says which. The compression ratio is against the
    study's model, also for a method that builds its own network."""
    start = time.perf_counter()
    config, filled = check_trial_config(config)
    if filled:
        log(f"{config.method}: parameters not in the config, from its search space: "
            + " ".join(f"{k}={short(v)}" for k, v in filled.items()))
    # what the compression ratio is against where the method builds its own network (built before the seed is set)
    study_params = count_params(create_model(config.model, in_shape=data.in_shape, num_classes=data.num_classes,
                                             adapt=config.model_adapt, **config.model_kwargs)
                                ) if get_method(config.method).builds_model else None
    seed_everything(config.seed)
    fit, evaluator = resolve_loop(config.train)
    model = build_model(config, in_shape=data.in_shape, num_classes=data.num_classes).to(data.device)
    base = None if config.base.in_trial else functools.partial(
        (bases or BaseNetworks()).load_into, config=config, data=data, log=log, callbacks=[EpochPrinter(log, "base:")])
    ctx = TrialContext(data=data, train_config=config.train, seed=config.seed, callbacks=callbacks, log=log,
                       checkpointer=checkpointer, fit=fit, evaluator=evaluator, pruning=config.pruning,
                       target=size_target(config), base=base)
    result = compress_model(model, config=config, ctx=ctx, in_shape=data.in_shape, study_params=study_params)
    result.info.update({"filled_params": filled} if filled else {})
    result.info.update({"base": ctx.base_info} if ctx.base_info else {})
    result.seconds = time.perf_counter() - start
    return result


def compress_model(model: nn.Module, *, config: TrialConfig, ctx: TrialContext, in_shape,
                   study_params: int | None = None) -> TrialResult:
    """Check ``model`` for ``config``'s method (before any training), compress it with ``ctx``, measure the
    result and score it with ``ctx.evaluate`` on the validation and test splits; mark a result that removed
    nothing (``nothing_removed``, also logged). ``config.params`` is complete. ``study_params``: the parameter
    count the compression ratio is against (the study's model, where the method built its own), else ``model``'s."""
    start = time.perf_counter()
    method = get_method(config.method)
    check_method(method, model, example_input=ctx.examples(CHECK_EXAMPLES), params=config.params,
                 pruning=config.pruning)
    widths_before = layer_widths(model)
    baseline = count_params(model)
    result = method.compress(model, ctx, config.params)
    compressed = result.model
    measurements = measure(compressed, in_shape=in_shape, latency_config=config.latency, device=ctx.data.device,
                           size_bytes=result.size_bytes)
    params = measurements.nonzeros if result.sparse else measurements.params
    unchanged = None if method.builds_model or params < baseline else (
        f"removed nothing: {config.method} left {params:,} {'non-zero ' if result.sparse else ''}parameters of "
        f"the {baseline:,} it started with")
    if unchanged:
        ctx.log(unchanged)
    return TrialResult(
        config=config, model=compressed,
        val_accuracy=ctx.evaluate(compressed, "val"), test_accuracy=ctx.evaluate(compressed, "test"),
        measurements=measurements, baseline_params=baseline if study_params is None else study_params,
        sparse=result.sparse,
        widths_before=widths_before,
        widths_after=layer_density(compressed) if result.sparse else layer_widths(compressed),
        history=ctx.history, info=dict(result.info), seconds=time.perf_counter() - start, nothing_removed=unchanged,
        in_shape=tuple(in_shape), num_classes=ctx.data.num_classes, input_spec=ctx.data.input_spec())


class EpochPrinter(Callback):
    """Prints one progress line per epoch."""

    def __init__(self, log: Callable[[str], None], prefix: str) -> None:
        self.log, self.prefix = log, prefix

    def on_epoch_end(self, model, record) -> None:
        self.log(f"{self.prefix} epoch {record['epoch']:>3} {record.get('phase', ''):<9} "
                 f"loss {record['loss']:.4f}  val {100 * record['val_accuracy']:.2f}%  ({record['seconds']:.1f}s)")


def short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)
