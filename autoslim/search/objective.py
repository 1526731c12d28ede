"""One trial, end to end: config -> model -> method -> measurements -> objective values.

:func:`run_trial` is independent of Optuna (``autoslim train`` uses it to
retrain an exported configuration); :class:`Objective` wraps it for a study:
it samples the method and its knobs, runs the trial and stores everything in
the trial's user attrs.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optuna
from torch import nn

from autoslim.checkpoint import Checkpointer, TrialCheckpoints, run_resumable
from autoslim.config import ConstraintsConfig, StudyConfig, TrialConfig
from autoslim.data import Data
from autoslim.heartbeat import Heartbeat, TrialLost, claim, retry_of, still_running
from autoslim.measure import Measurements, count_params, layer_density, layer_widths, measure
from autoslim.methods import TrialContext, get_method
from autoslim.models import create_model
from autoslim.search.halving import SuccessiveHalving, rungs_for, stop_trial
from autoslim.search.space import SearchSpace
from autoslim.train import Callback, Diverged, evaluate, seed_everything
from autoslim.trial import check_trial_config

CHECK_EXAMPLES = 8  # validation images a method's check runs the untrained model on


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
    return create_model(config.model, in_shape=in_shape, num_classes=num_classes, **config.model_kwargs)


def run_trial(config: TrialConfig, *, data: Data, callbacks: Sequence[Callback] = (),
              log: Callable[[str], None] = lambda s: None, checkpointer: Checkpointer | None = None) -> TrialResult:
    """Build, check, train and compress the network of ``config`` on ``data``; measure the result.

    ``config`` is checked as a study checks a trial (:func:`autoslim.trial.check_trial_config`); the
    method's parameters it leaves out take their search-space defaults, logged and
    recorded in ``info["filled_params"]`` (the result's ``config`` holds them all).
    The method checks the untrained model first (:meth:`autoslim.methods.Method.check`): a model it cannot
    compress is refused (UsageError) before any epoch. A method that compresses the study's model but left
    as many parameters (non-zeros for a sparse result) as it started with is marked: ``nothing_removed``
    holds the reason, which is also logged.
    ``checkpointer`` (:class:`autoslim.checkpoint.Checkpointer`) checkpoints every epoch and resumes."""
    start = time.perf_counter()
    config, filled = check_trial_config(config)
    if filled:
        log(f"{config.method}: parameters not in the config, from its search space: "
            + " ".join(f"{k}={_short(v)}" for k, v in filled.items()))
    seed_everything(config.seed)
    method = get_method(config.method)
    model = build_model(config, in_shape=data.in_shape, num_classes=data.num_classes).to(data.train.x.device)
    method.check(model, example_input=data.val.x[:CHECK_EXAMPLES], params=config.params)
    widths_before = layer_widths(model)
    baseline = count_params(model)
    ctx = TrialContext(data=data, train_config=config.train, seed=config.seed, callbacks=callbacks, log=log,
                       checkpointer=checkpointer)
    result = method.compress(model, ctx, config.params)
    compressed = result.model
    measurements = measure(compressed, in_shape=data.in_shape, size_bytes=result.size_bytes)
    params = measurements.nonzeros if result.sparse else measurements.params
    unchanged = None if method.builds_model or params < baseline else (
        f"removed nothing: {config.method} left {params:,} {'non-zero ' if result.sparse else ''}parameters of "
        f"the {baseline:,} it started with")
    if unchanged:
        log(unchanged)
    return TrialResult(
        config=config, model=compressed,
        val_accuracy=evaluate(compressed, data.val), test_accuracy=evaluate(compressed, data.test),
        measurements=measurements, baseline_params=baseline, sparse=result.sparse,
        widths_before=widths_before,
        widths_after=layer_density(compressed) if result.sparse else layer_widths(compressed),
        history=ctx.history, info={**result.info, **({"filled_params": filled} if filled else {})},
        seconds=time.perf_counter() - start, nothing_removed=unchanged)


class Deadline(Callback):
    """Stops a trial at the first optimizer step after ``deadline`` (a ``time.time()``): pruned, partial results kept."""

    def __init__(self, trial: optuna.Trial, deadline: float) -> None:
        self.trial, self.deadline, self.history = trial, deadline, []

    def on_step_end(self, model, step) -> None:
        if time.time() > self.deadline:
            stop_trial(self.trial, f"stopped at step {step}, after {len(self.history)} epoch(s): "
                                   "the study's strict timeout was reached", self.history)

    def on_epoch_end(self, model, record) -> None:
        self.history.append(dict(record))


class EpochPrinter(Callback):
    """Prints one progress line per epoch."""

    def __init__(self, log: Callable[[str], None], prefix: str) -> None:
        self.log, self.prefix = log, prefix

    def on_epoch_end(self, model, record) -> None:
        self.log(f"{self.prefix} epoch {record['epoch']:>3} {record.get('phase', ''):<9} "
                 f"loss {record['loss']:.4f}  val {100 * record['val_accuracy']:.2f}%  ({record['seconds']:.1f}s)")


class Objective:
    """The Optuna objective of a study: sample, run, store, return the objective values."""

    def __init__(self, study_config: StudyConfig, data: Data, spaces: Mapping[str, SearchSpace], *,
                 method_data: Mapping[str, Data] | None = None, log: Callable[[str], None] = print,
                 artifact_store=None, deadline: float | None = None) -> None:
        self.cfg, self.data, self.spaces, self.log = study_config, data, dict(spaces), log
        self.method_data = dict(method_data or {})  # a method's own training images (methods.<name>.data)
        missing = sorted(m for m, c in study_config.methods.items() if c.data and m not in self.method_data)
        if missing:
            raise ValueError(f"methods.{missing[0]}.data is set: pass method_data=autoslim.study.load_method_data(cfg)")
        self.artifact_store = artifact_store  # optuna artifact store for per-trial files; None: none kept
        self.deadline = deadline  # time.time() after which a running trial stops at its next epoch end

    def trial_config(self, trial: optuna.Trial) -> TrialConfig:
        method = trial.suggest_categorical("method", list(self.spaces))
        params = self.spaces[method].suggest(trial)
        return TrialConfig(method=method, params=params, model=self.cfg.model, model_kwargs=self.cfg.model_kwargs,
                           data=self.cfg.data_for(method), train=self.cfg.train_for(method),
                           seed=self.cfg.seed + _original_number(trial), device=self.cfg.device)

    def __call__(self, trial: optuna.Trial) -> Sequence[float]:
        """Run the trial. A NaN/infinite loss prunes it (user attr ``pruned_reason``), as does a compression
        that removed nothing unless the study file says ``nothing_removed: keep`` (then it completes, marked by
        the user attr ``nothing_removed``); an error fails it (user attr ``error``, one line); the study goes on
        either way. A trial failed under this worker
        raises :class:`~autoslim.heartbeat.TrialLost` with the line to print (:mod:`autoslim.heartbeat`)."""
        try:
            return self._attempt(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # a write to the trial was refused: it has finished
            raise TrialLost(self._hand_over(trial, None)) from None
        except TrialLost as lost:
            if lost.message:
                raise
            raise TrialLost(self._hand_over(trial, lost.result)) from None

    def _attempt(self, trial: optuna.Trial) -> Sequence[float]:
        prefix = f"[trial {trial.number}]"
        try:
            return self._run(trial)
        except Diverged as e:
            trial.set_user_attr("pruned_reason", f"diverged: {e}")
            self.log(f"{prefix} pruned: diverged: {e}")
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            trial.set_user_attr("error", error)
            self.log(f"{prefix} failed: {error}")
            raise

    def _run(self, trial: optuna.Trial) -> Sequence[float]:
        config = self.trial_config(trial)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        prefix = f"[trial {trial.number}]"
        knobs = " ".join(f"{k}={_short(v)}" for k, v in config.params.items())
        self.log(f"{prefix} {config.method}: {knobs}")
        with Heartbeat(trial, every=self.cfg.recovery.heartbeat_interval) as heartbeat:
            callbacks: list[Callback] = [heartbeat, EpochPrinter(self.log, prefix)]
            stopping = self.cfg.early_stopping
            if stopping.enabled:
                callbacks.append(SuccessiveHalving(trial, rungs=rungs_for(self.cfg, config.method), eta=stopping.eta,
                                                   min_trials=stopping.min_trials))
            if self.deadline is not None:
                callbacks.append(Deadline(trial, self.deadline))

            def log(message: str) -> None:
                self.log(f"{prefix} {message}")

            data = self.method_data.get(config.method, self.data)
            result = run_resumable(lambda checkpointer: run_trial(config, data=data, callbacks=callbacks, log=log,
                                                                  checkpointer=checkpointer),
                                   self._checkpoints(trial), log=log)
            if heartbeat.lost or not still_running(trial):
                raise TrialLost(result=result)
            try:
                values = self._store(trial, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                raise TrialLost(result=result) from None
        if values is None:
            self.log(f"{prefix} pruned (nothing_removed: prune): {result.nothing_removed}")
            raise optuna.TrialPruned(result.nothing_removed)
        self.log(f"{prefix} done in {result.seconds:.1f}s: val {100 * result.val_accuracy:.2f}% "
                 f"(test {100 * result.test_accuracy:.2f}%), params {result.params:,} "
                 f"({result.user_attrs()['compression']:.1f}x smaller), FLOPs {result.measurements.flops:,}")
        return values

    def _checkpoints(self, trial: optuna.Trial) -> TrialCheckpoints | None:
        if self.artifact_store is None or not self.cfg.recovery.checkpoint:
            return None
        return TrialCheckpoints(trial, store=self.artifact_store)

    def _store(self, trial: optuna.Trial, result: TrialResult) -> list[float] | None:
        """Store ``result`` as ``trial``'s (user attrs, constraints, artifacts); return its objective values, or
        None for a trial to prune (it removed nothing and the study says ``nothing_removed: prune``: only its
        user attrs are stored, ``pruned_reason`` among them)."""
        for k, v in result.user_attrs().items():
            trial.set_user_attr(k, v)
        if result.nothing_removed and self.cfg.nothing_removed == "prune":
            trial.set_user_attr("pruned_reason", result.nothing_removed)
            return None
        for name, value in constraint_values(self.cfg.constraints, result).items():
            trial.set_constraint(name, value)
        if self.artifact_store is not None:
            from autoslim.artifacts import upload_trial_artifacts
            upload_trial_artifacts(trial, result, artifact_store=self.artifact_store,
                                   in_shape=self.data.in_shape, num_classes=self.data.num_classes)
        return [result.objective(o) for o in self.cfg.objectives]

    def _hand_over(self, trial: optuna.Trial, result: TrialResult | None) -> str:
        """What becomes of ``trial``, failed under this worker, and of its ``result`` if it finished: the line
        to print. A finished result is stored as the trial's retry if the retry has not started yet."""
        study, prefix = trial.study, f"[trial {trial.number}]"
        lost = f"{prefix} was failed while it ran in this worker (`autoslim recover`, or a stale heartbeat)"
        retry = retry_of(study, trial.number)
        if result is None:
            if retry is None:
                return f"{lost}; stopped it (it was not retried)"
            ck = retry.user_attrs.get("checkpoint")
            resumes = f"resumes after epoch {ck['epoch']}" if ck else "starts over (no checkpoint)"
            return f"{lost}; stopped it: its retry, trial {retry.number}, {resumes}"
        done = f"its finished result (val {100 * result.val_accuracy:.2f}%, params {result.params:,})"
        if retry is None or not claim(study, retry):
            why = "it was not retried" if retry is None else f"its retry, trial {retry.number}, has started"
            return f"{lost}; {done} is discarded: {why}"
        adopted = optuna.Trial(study, retry._trial_id)
        try:
            values = self._store(adopted, result)
            checkpoints = self._checkpoints(adopted)
            if checkpoints is not None:
                checkpoints.discard()  # the files it inherited
            if values is None:
                study.tell(adopted, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(adopted, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            return f"{lost}; {done} is discarded: its retry, trial {retry.number}, was failed too"
        return f"{lost}; {done} is stored as its retry's, trial {retry.number}"


def constraint_values(budgets: ConstraintsConfig, result: TrialResult) -> dict[str, float]:
    """Optuna constraint values (feasible when <= 0) of the budgets a study file sets."""
    values = {}
    if budgets.max_params is not None:
        values["max_params"] = result.params - budgets.max_params
    if budgets.max_flops is not None:
        values["max_flops"] = result.measurements.flops - budgets.max_flops
    if budgets.min_accuracy is not None:
        values["min_accuracy"] = budgets.min_accuracy - result.val_accuracy
    return values


def _original_number(trial: optuna.Trial) -> int:
    """The number of the trial that ``trial`` retries (system attr of Optuna's retry callback), else its own."""
    return trial.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial", trial.number)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)
