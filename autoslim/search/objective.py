"""The Optuna objective of a study: sample a trial's method and knobs, run it, store what it measured.

:class:`Objective` wraps :func:`autoslim.trial.run_trial` for a study: it samples
the method and its knobs, adds the study's callbacks (progress, early-stopping
rungs, the heartbeat, a strict deadline), checkpoints and resumes through the
artifact store, and stores the result in the trial's user attrs, constraints and
artifacts.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Callable, Mapping, Sequence

import optuna

from autoslim.artifacts import upload_trial_artifacts
from autoslim.basenet import BaseNetworks
from autoslim.checkpoint import TrialCheckpoints, run_resumable
from autoslim.config import ConstraintsConfig, PruningConfig, StudyConfig, TrialConfig, TrialTarget, budget
from autoslim.data import Data
from autoslim.errors import TargetUnreachable
from autoslim.heartbeat import Heartbeat, TrialLost, claim, retry_of, still_running
from autoslim.methods import get_method
from autoslim.search.halving import SuccessiveHalving, rungs_for, stop_trial
from autoslim.space import SearchSpace
from autoslim.train import Callback, Diverged
from autoslim.trial import EpochPrinter, TrialResult, run_trial, short, size_target


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
        self.bases: BaseNetworks | None = None  # the study's shared base networks, once a trial has run

    def trial_config(self, trial: optuna.Trial) -> TrialConfig:
        method = trial.suggest_categorical("method", list(self.spaces))
        target = self.target(trial, method)
        fixed = get_method(method).size_knobs if target is not None and target.rule == "target" else ()
        params = self.spaces[method].suggest(trial, fixed=fixed)
        config = TrialConfig(method=method, params=params, model=self.cfg.model, model_kwargs=self.cfg.model_kwargs,
                             model_adapt=self.cfg.model_adapt,
                             data=self.cfg.data_for(method), train=self.cfg.train_for(method),
                             seed=self.cfg.seed + _original_number(trial), device=self.cfg.device,
                             latency=self.cfg.latency,
                             pruning=self.cfg.pruning if get_method(method).structured else PruningConfig(),
                             target=target, base=self.cfg.base_for_trial())
        if target is None:
            return config
        # a knob that is the size (ThriftyNet's budget) holds the target, in the stored config and the trial's line
        return dataclasses.replace(config, params=get_method(method).with_target(params, size_target(config)))

    def target(self, trial: optuna.Trial, method: str) -> TrialTarget | None:
        """The size ``method``'s trial removes down to, under the study's budget
        (:class:`~autoslim.config.TargetConfig`): None without a budget, for a method that cannot reach one of its
        measure, or under removal ``threshold`` (``both``: the Optuna parameter ``removal`` picks); a warm-start
        trial runs its method's own rule capped at the budget; else the Optuna parameter ``target_params``
        (``target_flops``), log-uniform from ``low`` to ``high`` times the budget."""
        found = budget(self.cfg.constraints)
        if found is None or found[0] not in get_method(method).target_measures:
            return None
        measure, value = found
        if trial.user_attrs.get("warm_start"):
            return TrialTarget(measure=measure, value=value, rule="cap")
        removal = self.cfg.removal
        if removal == "both":
            removal = trial.suggest_categorical("removal", ["target", "threshold"])
        if removal == "threshold":
            return None
        low, high = (max(1, round(f * value)) for f in (self.cfg.target.low, self.cfg.target.high))
        return TrialTarget(measure=measure, value=trial.suggest_int(f"target_{measure}", low, high, log=True))

    def __call__(self, trial: optuna.Trial) -> Sequence[float]:
        """Run the trial. A NaN/infinite loss prunes it (user attr ``pruned_reason``), as do a size target below
        the smallest network its knobs build (:class:`~autoslim.errors.TargetUnreachable`) and a compression
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
        except (Diverged, TargetUnreachable) as e:
            reason = f"diverged: {e}" if isinstance(e, Diverged) else str(e)
            trial.set_user_attr("pruned_reason", reason)
            self.log(f"{prefix} pruned: {reason}")
            raise optuna.TrialPruned(reason) from None
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
        knobs = " ".join(f"{k}={short(v)}" for k, v in config.params.items())
        goal = config.target
        size = "" if goal is None else f" target={goal.value:,} {goal.measure}{' (cap)' * (goal.rule == 'cap')}"
        self.log(f"{prefix} {config.method}: {knobs}{size}")
        with Heartbeat(trial, every=self.cfg.recovery.heartbeat_interval) as heartbeat:
            callbacks: list[Callback] = [heartbeat, EpochPrinter(self.log, prefix)]
            stopping = self.cfg.early_stopping
            if stopping.enabled:
                rungs = rungs_for(self.cfg, config.method, config.params)
                callbacks.append(SuccessiveHalving(trial, rungs=rungs, eta=stopping.eta,
                                                   min_trials=stopping.min_trials))
            if self.deadline is not None:
                callbacks.append(Deadline(trial, self.deadline))

            def log(message: str) -> None:
                self.log(f"{prefix} {message}")

            data = self.method_data.get(config.method, self.data)
            self.bases = self.bases or BaseNetworks(study=trial.study, artifact_store=self.artifact_store)
            result = run_resumable(lambda checkpointer: run_trial(config, data=data, callbacks=callbacks, log=log,
                                                                  checkpointer=checkpointer, bases=self.bases),
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
        """:func:`store_result` with the study's objectives, budgets, artifact store and ``nothing_removed``."""
        return store_result(trial, result, objectives=self.cfg.objectives, constraints=self.cfg.constraints,
                            artifact_store=self.artifact_store, nothing_removed=self.cfg.nothing_removed)

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


def store_result(trial: optuna.Trial, result: TrialResult, *, objectives: Sequence[str],
                 constraints: ConstraintsConfig, artifact_store, nothing_removed: str) -> list[float] | None:
    """Store ``result`` as ``trial``'s (user attrs, constraints, artifacts when ``artifact_store`` is not None);
    return its values of ``objectives``, or None for a trial to prune (it removed nothing and
    ``nothing_removed`` is ``"prune"``: only its user attrs are stored, ``pruned_reason`` among them)."""
    for k, v in result.user_attrs().items():
        trial.set_user_attr(k, v)
    if result.nothing_removed and nothing_removed == "prune":
        trial.set_user_attr("pruned_reason", result.nothing_removed)
        return None
    for name, value in constraint_values(constraints, result).items():
        trial.set_constraint(name, value)
    if artifact_store is not None:
        upload_trial_artifacts(trial, result, artifact_store=artifact_store, in_shape=result.in_shape,
                               num_classes=result.num_classes)
    return [result.objective(o) for o in objectives]


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
