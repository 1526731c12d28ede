"""Failing the trials whose worker died, queuing their retries, and the study's trial slots (exactly n trials).

**One liveness signal.** A running trial shows it is alive by the heartbeat its
worker writes into the trial's system attrs every ``recovery.heartbeat_interval``
seconds (:mod:`autoslim.heartbeat`), by its last epoch checkpoint, or by its start.
It is the only signal, on every storage (a journal file, SQLite, PostgreSQL,
Optuna's gRPC proxy): the workers fail a trial silent for longer than
``recovery.grace_period`` (default: twice the interval) and retry it
(:mod:`autoslim.distributed`), and ``autoslim recover`` does the same by hand::

    autoslim recover studies/x.yaml --older-than 10m [--storage x.journal]

``--older-than`` must be at least twice the heartbeat interval of the running
trials (a live worker's last beat may be almost one interval old, and a busy
machine writes it late); a shorter age is refused in one line, since it would
fail trials whose workers are alive. Such a worker, should its trial be failed
under it anyway, stops working on it with one line (:mod:`autoslim.heartbeat`).

Each stale trial is failed with one check-and-set state change (RUNNING to
FAIL: when two processes fail the same trial, only one change succeeds, and only
that process queues the retry). The retry is queued the way Optuna's heartbeat
does it (:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`: same
parameters and user attrs, system attrs ``failed_trial`` and ``retry_history``);
the next worker picks the retry up first and resumes it from the dead trial's
checkpoint (:mod:`autoslim.checkpoint`). Past ``recovery.max_retry`` retries a
fresh trial (new parameters) takes its slot instead.

**Slots.** A study of ``n_trials`` trials holds them as ``n_trials`` slots
(system attr ``autoslim:slot``, 0 to n-1): each slot is first a WAITING trial
(``enqueue_trial``-style: no parameter fixed, so the sampler samples them when
they start), and workers only ever start a waiting trial (:func:`top_up`,
:func:`take_waiting`). A trial that fails passes its slot on: to its retry, or
to a fresh waiting trial (:func:`replace`). Two processes that top up at once
may queue a slot twice; the trial with the lowest id among a slot's live
(not failed) trials owns it, and a worker that takes another one fails it at
once, marked ``autoslim:duplicate``, without running it.
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
from autoslim.heartbeat import claim, last_heartbeat

SLOT_KEY = "autoslim:slot"
DUPLICATE_KEY = "autoslim:duplicate"

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
    if retry is not None:
        log(f"trial {trial.number}: failed; retry queued as trial {retry.number} ({resumes})")
        return retry
    fresh = replace(study, trial)
    log(f"trial {trial.number}: failed; not retried (already retried {max_retry} times)"
        + (f"; a fresh trial {fresh.number} takes its slot" if fresh else ""))
    return None


def recover(study: optuna.Study, *, older_than: float, max_retry: int | None = None,
            log: Callable[[str], None] = print) -> list[FrozenTrial]:
    """Requeue every RUNNING trial of ``study`` silent for more than ``older_than`` seconds; return the retries.

    Safe while workers run: each trial is failed by one check-and-set state change, which only one process wins.

    >>> recover(study, older_than=600)  # doctest: +SKIP
    trial 3: failed; retry queued as trial 9 (resumes after epoch 4)
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    beats = [(beat[1], t.number) for t in running if (beat := last_heartbeat(t)) is not None]
    if beats and older_than < 2 * max(beats)[0]:
        every, number = max(beats)
        raise UsageError(f"--older-than: {older_than:g}s would fail trials whose workers are alive: running trial "
                         f"{number} writes a heartbeat every {every:g}s; accepted: {2 * every:g}s or more")
    stale = stale_trials(running, older_than=older_than)
    if not stale:
        log(f"study {study.study_name!r}: no stale trials ({len(running)} running, none silent for "
            f"more than {older_than:g}s)")
    retries = [requeue(study, t, max_retry=max_retry, log=log) for t in stale]
    return [r for r in retries if r is not None]


def stale_trials(trials: list[FrozenTrial], *, older_than: float) -> list[FrozenTrial]:
    """The RUNNING ``trials`` that showed no sign of life (:func:`last_sign_of_life`) for ``older_than`` seconds."""
    now = datetime.datetime.now()
    return [t for t in trials if t.state == TrialState.RUNNING
            and (now - last_sign_of_life(t)).total_seconds() > older_than]


def slot_of(trial: FrozenTrial) -> int | None:
    """The slot ``trial`` fills (None for a trial made before slots, or outside them)."""
    return trial.system_attrs.get(SLOT_KEY)


def enqueue(study: optuna.Study, *, slot: int | None, params: dict | None = None,
            user_attrs: dict | None = None) -> FrozenTrial:
    """Queue a WAITING trial for ``slot`` (as ``study.enqueue_trial(params)`` does); return it."""
    system_attrs = {"fixed_params": params or {}, **({SLOT_KEY: slot} if slot is not None else {})}
    template = optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=system_attrs,
                                         user_attrs=user_attrs or {})
    # The storage's own call (what study.add_trial makes), so that queuing n slots reads no trial list: reading
    # the study's trials after each one made setting up a 200-trial study take 10-20 s on SQLite.
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial(trial_id)


def replace(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    """Queue a fresh trial (new parameters) in the slot of the failed ``trial``; None if it had no slot."""
    slot = slot_of(trial)
    return None if slot is None else enqueue(study, slot=slot)


def top_up(study: optuna.Study, n_trials: int) -> list[int]:
    """Queue a waiting trial for every slot below ``n_trials`` that no live (not failed) trial fills; return the
    slots queued. Live trials made before slots count too (a study resumed by this version)."""
    live = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    taken = {s for t in live if (s := slot_of(t)) is not None}
    missing = n_trials - len(taken & set(range(n_trials))) - sum(slot_of(t) is None for t in live)
    slots = [k for k in range(n_trials) if k not in taken][:max(0, missing)]
    for k in slots:
        enqueue(study, slot=k)
    return slots


def is_duplicate(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether a live trial with a lower id fills the slot of ``trial`` (two processes topped up at once)."""
    slot = slot_of(trial)
    return slot is not None and any(t._trial_id < trial._trial_id and t.state != TrialState.FAIL
                                    and slot_of(t) == slot for t in study.get_trials(deepcopy=False))


def take_waiting(study: optuna.Study, *, n_trials: int, log: Callable[[str], None] = print) -> FrozenTrial | None:
    """Start a waiting trial of a slot below ``n_trials`` (retries first): one check-and-set state change to
    RUNNING, as ``study.ask`` pops a queued trial; a duplicate it took is failed at once. None if none is left."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    waiting = sorted((t for t in waiting if (slot_of(t) or 0) < n_trials),
                     key=lambda t: ("failed_trial" not in t.system_attrs, t.number))
    for trial in waiting:
        if not claim(study, trial):
            continue
        if not is_duplicate(study, trial):
            return study._storage.get_trial(trial._trial_id)
        _fail_duplicate(study, trial, log=log)
    return None


def drop_duplicates(study: optuna.Study, *, log: Callable[[str], None] = print) -> None:
    """Fail every waiting trial whose slot a live trial with a lower id fills (left by a top-up race)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if is_duplicate(study, trial) and claim(study, trial):
            _fail_duplicate(study, trial, log=log)


def _fail_duplicate(study: optuna.Study, trial: FrozenTrial, *, log: Callable[[str], None]) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, DUPLICATE_KEY, True)
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    log(f"trial {trial.number}: a second trial for slot {slot_of(trial)} (two workers topped up at once); "
        "failed without running")
