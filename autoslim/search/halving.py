"""Early stopping for multi-objective studies: successive halving by Pareto dominance.

Optuna's ``Trial.report``/``should_prune`` are unavailable in multi-objective
studies, so autoslim keeps its own rungs. When a trial has trained for a rung's
number of epochs (counted across a method's phases; a fractional rung such as
0.25 or 2.5 lies inside an epoch, after that fraction of its training batches),
it records ``(validation accuracy so far, non-zero parameters so far)`` as the
user attr ``rung_<epochs>`` (``rung_3``, ``rung_0.25``) - in the study's
storage, so every worker sharing it sees the record. When the trial goes on training (its first optimizer step after the
rung) it is ranked by non-dominated sorting among every trial that reached the
same rung (running, finished or stopped ones). It is stopped
(``optuna.TrialPruned``, partial results kept in its user attrs) when

- at least ``min_trials`` trials reached the rung,
- it is dominated by at least one of them, and
- it is not among the best ``ceil(n / eta)`` of them (front index first, then accuracy).

A trial that no other trial dominates always continues, and a trial whose
training ends at a rung completes: stopping it then would save nothing and
lose its result. The parameter count
"so far" is the number of non-zero parameters: structures that a method has
zeroed but not yet removed (l1/l2, SSS, IHT) count as gone already.

>>> should_stop((0.5, 100), [(0.9, 50), (0.8, 60)], eta=3, min_trials=3)
True
>>> should_stop((0.95, 100), [(0.9, 50), (0.8, 60)], eta=3, min_trials=3)
False
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
from torch import nn

from autoslim.config import StudyConfig
from autoslim.errors import UsageError
from autoslim.measure import count_nonzeros
from autoslim.methods import get_method
from autoslim.train import Callback

RUNG_PREFIX = "rung_"


def rungs_for(cfg: StudyConfig, method: str, params: Mapping[str, Any] | None = None) -> list[float]:
    """The early-stopping rungs of ``method``'s trials (with knobs ``params``) in study ``cfg``, in epochs across
    the phases the trial trains (a fraction: inside an epoch).

    ``methods.<method>.early_stopping.rungs``, else ``early_stopping.rungs``, else the defaults of
    :meth:`~autoslim.config.EarlyStoppingConfig.rungs_for` after the epochs the trial trains before it removes
    anything: its method's ``train.epochs`` of base training where each trial trains its own base
    (``base: {share: false}``; a shared base trains outside the trials), plus its ``train.epochs`` of regularized
    training (l1/l2, SSS); from the first epoch for a method that builds its own network.

    >>> cfg = StudyConfig.from_dict({"methods": {"trimming": {}, "thriftynet": {"train": {"epochs": 3}},
    ...                                          "l1l2": {"early_stopping": {"rungs": [8]}}, "sss": {}},
    ...                              "train": {"epochs": 6}})
    >>> rungs_for(cfg, "trimming"), rungs_for(cfg, "thriftynet"), rungs_for(cfg, "l1l2"), rungs_for(cfg, "sss")
    ([1, 3, 9], [0.25, 1, 3], [8], [7, 9, 15])
    >>> cfg.base.share = False
    >>> rungs_for(cfg, "trimming"), rungs_for(cfg, "sss", {"start": "base"}), rungs_for(cfg, "sss")
    ([7, 9, 15], [13, 15, 21], [7, 9, 15])
    """
    own = cfg.methods[method].rungs
    if own is not None:
        return list(own)
    found, epochs = get_method(method), cfg.train_for(method).epochs
    base_here = cfg.base.in_trial and found.starts_from_base(params or {})
    before = epochs * base_here + epochs * found.trains_before_removal
    return cfg.early_stopping.rungs_for(epochs=before, builds_model=found.builds_model)


def nondominated_ranks(points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Front index of each ``(accuracy, params)`` point: 0 for the Pareto front, 1 for the next, ..."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2) * np.array([-1.0, 1.0])  # both minimized
    dominated_by = ((pts[None, :, :] <= pts[:, None, :]).all(-1) & (pts[None, :, :] < pts[:, None, :]).any(-1))
    ranks = np.full(len(pts), -1)
    remaining, front = np.ones(len(pts), dtype=bool), 0
    while remaining.any():
        current = remaining & ~(dominated_by & remaining[None, :]).any(1)
        ranks[current] = front
        remaining &= ~current
        front += 1
    return ranks


def should_stop(point: tuple[float, float], others: Sequence[tuple[float, float]], *, eta: int, min_trials: int) -> bool:
    """Whether the trial at ``point`` is stopped at a rung that ``others`` also reached."""
    points = [tuple(point), *map(tuple, others)]
    n = len(points)
    if n < min_trials:
        return False
    ranks = nondominated_ranks(points)
    if ranks[0] == 0:
        return False
    order = sorted(range(n), key=lambda i: (ranks[i], -points[i][0], points[i][1], i))
    return order.index(0) >= math.ceil(n / eta)


def stop_trial(trial: optuna.Trial, reason: str, history: list[dict], **partial) -> None:
    """End ``trial`` as pruned, keeping the reason, its epochs so far and ``partial`` results in its user attrs."""
    for key, value in {"pruned_reason": reason, "history": history, **partial}.items():
        trial.set_user_attr(key, value)
    raise optuna.TrialPruned(reason)


def rung_key(rung: float) -> str:
    """The user attr that holds a trial's point at ``rung`` (epochs; a fraction for a rung inside an epoch).

    >>> rung_key(3), rung_key(3.0), rung_key(0.25), rung_key(2.5)
    ('rung_3', 'rung_3', 'rung_0.25', 'rung_2.5')
    """
    return f"{RUNG_PREFIX}{rung_text(rung)}"


def rung_text(rung: float) -> str:
    """``rung`` as written in a study file: ``3`` for 3.0, ``0.25``."""
    return str(int(rung)) if float(rung).is_integer() else repr(float(rung))


def batches_at(rung: float, batches: int) -> int:
    """After how many of an epoch's ``batches`` a rung inside it (its fractional part) is taken: the first step at
    which that fraction of the epoch's batches is done, at least one.

    >>> batches_at(0.25, 10), batches_at(2.5, 10), batches_at(0.01, 10), batches_at(0.3, 10)
    (3, 5, 1, 3)
    """
    return max(1, math.ceil(round((rung - math.floor(rung)) * batches, 9)))


class SuccessiveHalving(Callback):
    """The rung check of one trial: record its point at each rung; at its next optimizer step, stop it if it is
    among the worst that reached the rung.

    A whole rung (3) is taken at the end of that epoch, from the epoch's record. A fractional one (0.25, 2.5) is
    taken inside the epoch after ``floor(rung)`` epochs, after :func:`batches_at` of its batches (the fit's steps,
    counted through ``hooks.on_step_end``; ``hooks.batches_per_epoch`` steps an epoch): the validation split is
    scored then (the user's ``evaluate``, else top-1 accuracy). An epoch that ends before its fractional rung (a
    fit whose epochs take fewer steps than ``hooks.batches_per_epoch`` says) is refused in one line, never skipped
    silently. A worker killed between a rung and the next step loses that one check: its retry goes on training.
    """

    def __init__(self, trial: optuna.Trial, *, rungs: Sequence[float], eta: int, min_trials: int) -> None:
        self.trial, self.eta, self.min_trials = trial, eta, min_trials
        self.rungs = {r for r in rungs if float(r).is_integer()}
        self.fractional = [r for r in rungs if not float(r).is_integer()]
        self.taken: set[float] = set()  # the fractional rungs recorded
        self.batch = self.batches = 0  # steps done in the current epoch, of the steps an epoch takes
        self.history: list[dict] = []
        self.pending: list[tuple[float, tuple[float, int]]] = []  # (rung, point) recorded, not yet ranked

    def _record(self, rung: float, model: nn.Module, accuracy: float) -> None:
        point = (accuracy, count_nonzeros(model))
        self.trial.set_user_attr(rung_key(rung), list(point))
        self.pending.append((rung, point))

    def on_epoch_end(self, model: nn.Module, record: dict) -> None:
        self.history.append(dict(record))
        epoch = record["epoch"]
        missed = [r for r in self.fractional if math.floor(r) == epoch - 1 and r not in self.taken]
        if missed:
            raise UsageError(f"early_stopping.rungs: rung {rung_text(missed[0])} lies inside epoch {epoch}, which "
                             f"took {self.batch} step(s) (hooks.on_step_end calls) where hooks.batches_per_epoch is "
                             f"{self.batches}; a fit whose epochs take another number of steps sets "
                             "hooks.batches_per_epoch")
        self.batch = 0
        if epoch in self.rungs:
            self._record(epoch, model, record["val_accuracy"])

    def on_batch(self, model: nn.Module, *, epochs_done: int, batch: int, batches: int,
                 evaluate: Callable[[nn.Module], float]) -> None:
        self.batch, self.batches = batch, batches
        for rung in self.fractional:
            if math.floor(rung) == epochs_done and batches and batch == batches_at(rung, batches):
                self.taken.add(rung)
                self._record(rung, model, evaluate(model))

    def on_step_end(self, model: nn.Module, step: int) -> None:
        pending, self.pending = self.pending, []
        for rung, point in pending:
            rank_at_rung(self.trial, epoch=rung, point=point, eta=self.eta, min_trials=self.min_trials,
                         history=self.history)


def rank_at_rung(trial: optuna.Trial, *, epoch: float, point: tuple[float, int], eta: int, min_trials: int,
                 history: list[dict]) -> None:
    """Stop ``trial`` (:func:`stop_trial`) if its ``point`` at rung ``epoch`` is among the worst of the trials that
    recorded that rung (:func:`should_stop`)."""
    key = rung_key(epoch)
    others = [tuple(t.user_attrs[key]) for t in trial.study.get_trials(deepcopy=False)
              if t.number != trial.number and key in t.user_attrs]
    if should_stop(point, others, eta=eta, min_trials=min_trials):
        reason = (f"stopped at rung {rung_text(epoch)} epochs: val {100 * point[0]:.2f}% with {point[1]:,} non-zero "
                  f"parameters is dominated and not in the best 1/{eta} of {len(others) + 1} trials")
        stop_trial(trial, reason, history, val_accuracy=point[0], nonzeros=point[1])


def report_rung(trial: optuna.Trial, *, epoch: float, accuracy: float, model: nn.Module, eta: int = 3,
                min_trials: int = 3) -> None:
    """Multi-objective early stopping inside your own Optuna objective: call it after the epochs you choose as
    rungs (the same ones in every trial of the study, counted your way; a float for a rung inside an epoch,
    ``epoch=0.25`` after a quarter of the first epoch's batches).

    It records ``(accuracy, non-zero parameters of model)`` as the trial's user attr ``rung_<epoch>`` (``rung_2``,
    ``rung_0.25``; in the
    storage: every worker sees it) and raises ``optuna.TrialPruned`` (user attr ``pruned_reason``) when at least
    ``min_trials`` trials reached this rung, this one is dominated by one of them, and it is not among the best
    ``ceil(n / eta)`` (front index, then accuracy). Higher ``accuracy`` is better.

    >>> import optuna
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> for acc in (0.9, 0.8, 0.3):
    ...     trial = study.ask()
    ...     try:
    ...         report_rung(trial, epoch=2, accuracy=acc, model=nn.Linear(10, 10))
    ...     except optuna.TrialPruned as e:
    ...         print(e)
    stopped at rung 2 epochs: val 30.00% with 110 non-zero parameters is dominated and not in the best 1/3 of 3 trials
    """
    point = (float(accuracy), count_nonzeros(model))
    trial.set_user_attr(rung_key(epoch), list(point))
    rank_at_rung(trial, epoch=epoch, point=point, eta=eta, min_trials=min_trials, history=[])
