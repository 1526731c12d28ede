"""``autoslim recover``: fail the trials whose worker died and queue a retry of each that resumes it.

An RDB storage does this by itself (Optuna's heartbeat, :mod:`autoslim.distributed`).
On a journal file a trial whose worker died stays RUNNING. A trial counts as
stale when it has shown no sign of life (its start, its last epoch checkpoint,
or the heartbeat its worker writes every ``recovery.heartbeat_interval``
seconds, :mod:`autoslim.heartbeat`) for longer than ``--older-than``::

    autoslim recover studies/x.yaml --older-than 10m [--storage x.journal]

``--older-than`` must be at least twice the heartbeat interval of the running
trials (a live worker's last beat may be almost one interval old, and a busy
machine writes it late); a shorter age is refused in one line, since it would
fail trials whose workers are alive. Such a worker, should its trial be failed
under it anyway, stops working on it with one line (:mod:`autoslim.heartbeat`).

Each stale trial is failed, and a retry is queued the way Optuna's heartbeat
does it (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`: same
parameters and user attrs, system attrs ``failed_trial`` and
``retry_history``); the next worker picks the retry up first and resumes it
from the dead trial's checkpoint (:mod:`autoslim.checkpoint`).
"""

from __future__ import annotations

import datetime
import re
import warnings
from typing import Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from autoslim.errors import UsageError
from autoslim.heartbeat import last_heartbeat

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``90s``, ``10m``, ``2h`` or ``1d`` (a bare number is seconds).

    >>> parse_age("10m"), parse_age("1.5h"), parse_age("30")
    (600.0, 5400.0, 30.0)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise UsageError(f"--older-than: {text!r} is not an age; accepted: a number with s, m, h or d (e.g. 10m)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def last_sign_of_life(trial: FrozenTrial) -> datetime.datetime:
    """When ``trial`` last showed it was alive: its last heartbeat or epoch checkpoint, else its start.

    >>> last_sign_of_life(study.trials[3])  # doctest: +SKIP
    datetime.datetime(2026, 1, 5, 14, 2, 11)
    """
    checkpoint = trial.user_attrs.get("checkpoint") or {}
    saved = checkpoint.get("saved_at") if checkpoint.get("trial") == trial.number else None
    beat = last_heartbeat(trial)
    start = trial.datetime_start or datetime.datetime.now()
    return max([start, *([datetime.datetime.fromisoformat(saved)] if saved else []), *([beat[0]] if beat else [])])


def requeue(study: optuna.Study, trial: FrozenTrial, *, max_retry: int | None = None,
            log: Callable[[str], None] = print) -> FrozenTrial | None:
    """Fail ``trial`` if it is running and queue its retry; return the retry (None past ``max_retry`` retries).

    >>> requeue(study, study.trials[3])  # doctest: +SKIP
    FrozenTrial(number=9, state=TrialState.WAITING, ...)
    """
    if trial.state == TrialState.RUNNING:
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            log(f"trial {trial.number}: finished meanwhile; left as it is")
            return None
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)(
            study, study._storage.get_trial(trial._trial_id))
    retry = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                  if t.number not in before), None)
    checkpoint = trial.user_attrs.get("checkpoint")
    resumes = f"resumes after epoch {checkpoint['epoch']}" if checkpoint else "no checkpoint: starts over"
    log(f"trial {trial.number}: failed; " + (f"retry queued as trial {retry.number} ({resumes})" if retry
                                             else f"not retried (already retried {max_retry} times)"))
    return retry


def recover(study: optuna.Study, *, older_than: float, max_retry: int | None = None,
            log: Callable[[str], None] = print) -> list[FrozenTrial]:
    """Requeue every RUNNING trial of ``study`` silent for more than ``older_than`` seconds; return the retries.

    Call it under the study lock (:func:`autoslim.storage.study_lock`) when workers may be running.

    >>> recover(study, older_than=600)  # doctest: +SKIP
    trial 3: failed; retry queued as trial 9 (resumes after epoch 4)
    """
    now = datetime.datetime.now()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beats = [(beat[1], t.number) for t in running if (beat := last_heartbeat(t)) is not None]
    if beats and older_than < 2 * max(beats)[0]:
        every, number = max(beats)
        raise UsageError(f"--older-than: {older_than:g}s would fail trials whose workers are alive: running trial "
                         f"{number} writes a heartbeat every {every:g}s; accepted: {2 * every:g}s or more")
    stale = [t for t in running if (now - last_sign_of_life(t)).total_seconds() > older_than]
    running = len(running)
    if not stale:
        log(f"study {study.study_name!r}: no stale trials ({running} running, none silent for "
            f"more than {older_than:g}s)")
    retries = [requeue(study, t, max_retry=max_retry, log=log) for t in stale]
    return [r for r in retries if r is not None]
