"""Several workers on one study: the study lock and the trial loop that finishes exactly ``n_trials`` trials.

Start the same command in as many processes, on as many machines, as you like;
they share the study through its storage (PostgreSQL; a journal file or SQLite
for processes on one machine)::

    autoslim optimize studies/x.yaml --storage postgresql://autoslim:pw@db/autoslim --artifact-dir /shared/x

**The study lock** serialises what must happen once: creating the storage's
tables and the study, setting its metric names and attrs, enqueuing its
warm-start trials, and each decision to start a trial. It is a PostgreSQL
advisory lock for a PostgreSQL storage, else an ``fcntl`` lock file beside the
storage file (or in the temp folder). The server, or the kernel, releases it
when its holder dies, so a killed worker never blocks the others.

**Exactly n trials.** A worker starts a trial only while, under the lock,
fewer than ``n_trials`` trials are finished (complete or pruned) or running,
and creates it (``study.ask`` inside ``study.optimize``) before it lets go of
the lock, so no two workers can take the last slot (Optuna's
``MaxTrialsCallback`` stops only after a trial ends, by which time up to
``workers - 1`` extra trials have started). A worker with nothing to start
waits while trials run elsewhere with a heartbeat (if one dies it is failed and
retried, see :mod:`autoslim.checkpoint`), and leaves when the study is done.
Without a heartbeat (a journal file) it leaves at once and says so: a trial
whose worker died stays running until ``autoslim recover`` requeues it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from autoslim.heartbeat import TrialLost
from autoslim.recover import requeue
from autoslim.storage import AdvisoryLock, FileLock


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


class _Started:
    """The objective, called with the study lock held: the trial exists now, so let go of the lock."""

    def __init__(self, objective: Callable[[optuna.Trial], Any], lock: FileLock | AdvisoryLock) -> None:
        self.objective, self.lock = objective, lock
        self.trial: optuna.Trial | None = None

    def __call__(self, trial: optuna.Trial) -> Any:
        self.trial = trial
        self.lock.release()
        return self.objective(trial)


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], Any], *, n_trials: int,
               lock: FileLock | AdvisoryLock, heartbeat: bool, max_trials: int | None = None,
               timeout: float | None = None, poll: float = 2.0, log: Callable[[str], None] = print) -> int:
    """Run trials until ``study`` holds ``n_trials`` finished ones; return how many this worker started.

    A trial that raises is recorded as failed and the worker goes on; a worker
    starts at most ``max_trials`` trials and none after ``timeout`` seconds.
    On Ctrl-C the trial in progress is failed and requeued: the next run
    resumes it from its checkpoint (:func:`autoslim.recover.requeue`). A trial
    failed under this worker by another process is left with one line
    (:mod:`autoslim.heartbeat`) and not counted; the worker goes on.

    >>> run_worker(study, objective, n_trials=20, lock=study_lock(url), heartbeat=True)  # doctest: +SKIP
    5
    """

    start, ran, said = time.monotonic(), 0, False
    started = _Started(objective, lock)
    while (max_trials is None or ran < max_trials) and (timeout is None or time.monotonic() - start < timeout):
        with lock:
            if heartbeat:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                              TrialState.RUNNING))
            running = [t.number for t in trials if t.state == TrialState.RUNNING]
            if len(trials) - len(running) >= n_trials:
                break
            if len(trials) < n_trials:
                started.trial = None
                try:
                    study.optimize(started, n_trials=1, catch=(Exception,))
                except KeyboardInterrupt:
                    interrupted = started.trial and study._storage.get_trial(started.trial._trial_id)
                    if interrupted and interrupted.state == TrialState.FAIL:
                        requeue(study, interrupted, log=log)
                    raise
                except TrialLost as lost:
                    log(lost.message)
                    continue
                except ValueError as e:  # Optuna could not tell the trial its result: it was failed just then
                    told = started.trial and study._storage.get_trial(started.trial._trial_id)
                    if not told or told.state != TrialState.FAIL or not str(e).startswith("Cannot tell"):
                        raise
                    log(f"[trial {told.number}] was failed under this worker as it finished; its result stays in "
                        "its user attrs and its retry, if any, runs it again")
                    continue
                ran += 1
                continue
        if not heartbeat:
            log(f"trial(s) {', '.join(map(str, running))} still run in other workers; nothing left to start here. "
                "If their worker died, `autoslim recover` requeues them.")
            break
        if not said:
            log(f"waiting for trial(s) {', '.join(map(str, running))} in other workers "
                "(a dead worker's trial is retried here after the heartbeat grace period)")
            said = True
        time.sleep(poll)
    return ran
