"""Several workers on one study: the trial loop that finishes exactly ``n_trials`` trials, without a lock.

Start the same command in as many processes, on as many machines, as you like;
they share the study through its storage (PostgreSQL, or Optuna's gRPC proxy in
front of it for hundreds of workers; a journal file for processes on one machine)::

    autoslim optimize studies/x.yaml --storage grpc://proxy:13000 --artifact-store s3://bucket/x

**Exactly n trials.** The study holds its ``n_trials`` trials as slots
(:mod:`autoslim.recover`): waiting trials queued when the study is created (or
when a resume raises ``n_trials``), and a worker only ever starts a waiting trial,
by one check-and-set state change (WAITING to RUNNING) that only one worker wins.
Nothing else creates trials (``study.ask`` would make a new one when the queue is
empty), so no lock is needed, and the rule holds on every storage, the gRPC proxy
included, which carries no database lock. A trial that fails passes its slot to
its retry (its worker died: it resumes from its checkpoint) or to a fresh trial
(it raised an error); the study ends when its slots are finished (completed or
pruned).

**Liveness.** A running trial's worker writes its heartbeat into the trial's
system attrs (:mod:`autoslim.heartbeat`); a worker with nothing to start waits
while trials run elsewhere, failing and retrying any silent for longer than the
grace period (``recovery.grace_period``, default twice
``recovery.heartbeat_interval``) — the same rule as ``autoslim recover``, on every
storage. Optuna's own RDB heartbeat is not used.

**The study lock** (a PostgreSQL advisory lock, else a lock file) now only
serialises, per storage, creating its tables and the study and numbering the
workers (:func:`worker_index`); through the gRPC proxy it is a lock of this
machine, and the study's creator is whoever's ``create_new_study`` succeeded.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoslim.heartbeat import TrialLost
from autoslim.recover import drop_duplicates, replace, requeue, stale_trials, take_waiting, top_up

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def worker_index(study: optuna.Study, *, storage: optuna.storages.BaseStorage) -> int:
    """How many workers started on ``study`` (in ``storage``) before this one; call it under the study lock.

    Worker ``k`` seeds its sampler with ``seed + k``: workers with one seed would sample the same parameters.

    >>> [worker_index(study, storage=storage) for _ in range(3)]  # doctest: +SKIP
    [0, 1, 2]
    """
    key = "autoslim:workers_started"
    started = storage.get_study_system_attrs(study._study_id).get(key, 0)
    storage.set_study_system_attr(study._study_id, key, started + 1)
    return started


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], Any], *, n_trials: int,
               stale_after: float, max_retry: int | None = None, max_trials: int | None = None,
               timeout: float | None = None, poll: float = 2.0, log: Callable[[str], None] = print) -> int:
    """Run trials until ``study`` holds ``n_trials`` finished ones; return how many this worker started.

    A trial that raises is recorded as failed, a fresh trial takes its slot and
    the worker goes on; a worker starts at most ``max_trials`` trials and none
    after ``timeout`` seconds. On Ctrl-C the trial in progress is failed and
    requeued: the next run resumes it from its checkpoint
    (:func:`autoslim.recover.requeue`). A trial failed under this worker by
    another process is left with one line (:mod:`autoslim.heartbeat`) and not
    counted; the worker goes on.

    >>> run_worker(study, objective, n_trials=20, stale_after=120)  # doctest: +SKIP
    5
    """
    start, ran, said = time.monotonic(), 0, False
    top_up(study, n_trials)  # a resume that raised n_trials
    while (max_trials is None or ran < max_trials) and (timeout is None or time.monotonic() - start < timeout):
        trials = study.get_trials(deepcopy=False)
        for stale in stale_trials(trials, older_than=stale_after):
            requeue(study, stale, max_retry=max_retry, log=log)
        if sum(t.state in FINISHED for t in trials) >= n_trials:
            drop_duplicates(study, log=log)
            break
        trial = take_waiting(study, n_trials=n_trials, log=log)
        if trial is not None:
            ran += _run_one(study, objective, trial, log=log)
            continue
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            if top_up(study, n_trials):  # a slot lost with a worker that died between failing a trial and
                continue                 # queuing its replacement
            break
        if not said:
            log(f"waiting for trial(s) {', '.join(map(str, running))} in other workers "
                f"(a dead worker's trial is retried here after {stale_after:g}s without a heartbeat)")
            said = True
        time.sleep(poll)
    return ran


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], Any], frozen: FrozenTrial, *,
             log: Callable[[str], None]) -> int:
    """Run the started trial ``frozen`` and tell the study its result (as ``study.optimize`` would after
    ``study.ask``); 1 if it counts as this worker's, 0 if it was failed under it."""
    study._thread_local.cached_all_trials = None
    try:
        trial = optuna.Trial(study, frozen._trial_id)  # samples relative parameters, as study.ask does
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            return _tell(study, trial, log=log, state=TrialState.PRUNED)
        except TrialLost as lost:
            log(lost.message)
            return 0
        except Exception:
            if _tell(study, trial, log=log, state=TrialState.FAIL):
                replace(study, study._storage.get_trial(frozen._trial_id))
            return 1
        return _tell(study, trial, log=log, values=values)
    except KeyboardInterrupt:
        interrupted = study._storage.get_trial(frozen._trial_id)
        if interrupted.state == TrialState.RUNNING:
            requeue(study, interrupted, log=log)
        raise


def _tell(study: optuna.Study, trial: optuna.Trial, *, log: Callable[[str], None], **result: Any) -> int:
    """``study.tell(trial, ...)``; 0 with one line if the trial was failed under this worker just then."""
    try:
        study.tell(trial, **result)
        return 1
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        told = study._storage.get_trial(trial._trial_id)
        if told.state != TrialState.FAIL:
            raise
        log(f"[trial {told.number}] was failed under this worker as it finished; its result stays in "
            "its user attrs and its retry, if any, runs it again")
        return 0
