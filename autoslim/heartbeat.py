"""A running trial's heartbeat, and what its worker does when the trial is failed under it.

**The heartbeat.** While a trial runs, a thread of its worker writes the time into
the trial's system attr ``autoslim:heartbeat`` (``{"at": ISO time, "every": seconds}``)
when the trial starts and then every ``recovery.heartbeat_interval`` seconds. It
needs nothing but a trial attr, which every Optuna storage keeps (a journal file,
SQLite, PostgreSQL, Optuna's gRPC proxy), so it is a sign of life on any of them:
``autoslim recover`` (:mod:`autoslim.recover`) leaves a trial with a fresh one alone.

**A trial failed under a live worker.** Something may still fail a trial whose
worker is alive (``autoslim recover`` run by hand, a stalled machine whose
heartbeat went stale past the grace period). Optuna then refuses every write to the trial
(``UpdateFinishedTrialError``): the heartbeat's next write, or the trial's next
attr or checkpoint, finds out, and the worker stops working on the trial with one
line (:class:`TrialLost`), never a traceback:

- still training: it stops at its next optimizer step and keeps its checkpoint,
  from which the trial's retry resumes;
- finished: its result becomes the retry's if the retry has not started (this
  worker takes the retry, :func:`claim`, and stores the result, artifacts and
  all, as that trial's), else it is discarded.

Either way the worker then goes on with the study's next trial (often that retry).

>>> import optuna
>>> study = optuna.create_study()
>>> trial = study.ask()
>>> with Heartbeat(trial, every=60) as heartbeat:
...     sorted(study.trials[0].system_attrs[HEARTBEAT_KEY])
['at', 'every']
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoslim.train import Callback

HEARTBEAT_KEY = "autoslim:heartbeat"


class TrialLost(BaseException):
    """The trial running in this worker was failed by another process: stop working on it.

    A ``BaseException``, as ``KeyboardInterrupt`` is: the objective's and Optuna's
    ``except Exception`` must not record it as the trial's own failure, and Optuna
    must not try to tell a trial that has already finished. ``result`` is the trial's
    finished result where it had one; the message, once set, is the line to print.
    """

    def __init__(self, message: str = "", *, result: Any = None) -> None:
        super().__init__(message)
        self.message, self.result = message, result


class Heartbeat(Callback):
    """Writes the trial's heartbeat on entry and every ``every`` seconds until exit, from a thread; as a
    :class:`~autoslim.train.Callback`, stops the training (:class:`TrialLost`) once a write was refused
    because the trial has finished."""

    def __init__(self, trial: optuna.Trial, *, every: float) -> None:
        self.trial, self.every = trial, every
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"autoslim heartbeat of trial {trial.number}",
                                        daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        """Record the time now; a refusal because the trial has finished sets :attr:`lost`."""
        now = datetime.datetime.now().isoformat()
        try:
            self.trial.storage.set_trial_system_attr(self.trial._trial_id, HEARTBEAT_KEY,
                                                     {"at": now, "every": self.every})
        except optuna.exceptions.UpdateFinishedTrialError:
            self.lost = True
        except Exception:  # the storage did not answer this time; the next beat tries again
            pass

    def _run(self) -> None:
        while not self.lost and not self._stop.wait(self.every):
            self.beat()

    def check(self) -> None:
        if self.lost:
            raise TrialLost()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.check()

    def on_epoch_end(self, model: nn.Module, record: dict) -> None:
        self.check()


def last_heartbeat(trial: FrozenTrial) -> tuple[datetime.datetime, float] | None:
    """When ``trial`` last wrote its heartbeat, and how often it writes one; None if it never did.

    A retry is created with its predecessor's system attrs: its own heartbeat, from its start, replaces it.
    """
    beat = trial.system_attrs.get(HEARTBEAT_KEY)
    if not isinstance(beat, dict) or "at" not in beat:
        return None
    return datetime.datetime.fromisoformat(beat["at"]), float(beat["every"])


def retry_of(study: optuna.Study, number: int) -> FrozenTrial | None:
    """The trial queued to retry trial ``number`` (the last entry of its ``retry_history``), if any."""
    return next((t for t in study.get_trials(deepcopy=False)
                 if (t.system_attrs.get("retry_history") or [None])[-1] == number), None)


def claim(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Take the waiting ``trial`` for this worker (as ``study.ask`` takes a queued trial); False if it is not
    waiting any more (another worker took it, or it finished)."""
    if trial.state != TrialState.WAITING:
        return False
    try:
        return study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def still_running(trial: optuna.Trial) -> bool:
    """Whether ``trial`` is still RUNNING in its storage (not failed under its worker)."""
    return trial.storage.get_trial(trial._trial_id).state == TrialState.RUNNING
