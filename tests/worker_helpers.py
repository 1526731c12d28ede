"""Helpers for the tests that run real worker processes (``python -m autoslim optimize``) on a shared storage."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

# Tiny trials: the storage and the processes are what is tested.
WORKER_STUDY = {"data": {"name": "digits", "train_subset": 200}, "model": "lenet300_100",
                "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
                "train": {"epochs": 1, "batch_size": 64}, "n_trials": 8, "warm_start": False,
                "sampler": {"name": "random"}}
# Trials of a few seconds, long enough to kill one mid-trial after a checkpoint: the study's base (3 epochs of
# ~0.3 s, trained once, shared) and then each trial's own 5 checkpointed retrain epochs, so a trial seen
# checkpointed after its epoch 1-3 (``checkpointed_mid_trial(t, last_epoch=3)``) has at least 2 epochs to go.
SLOW_STUDY = {**WORKER_STUDY, "data": {"name": "digits"}, "train": {"epochs": 3, "batch_size": 8},
              "methods": {"trimming": {"rounds": 1, "retrain_epochs": 5, "apoz_examples": 100}},
              "recovery": {"heartbeat_interval": 1, "grace_period": 2}}


def postgres_url() -> str:
    """The test server's URL (AUTOSLIM_TEST_POSTGRES_URL, set by .ci/run); skip without it, fail under CI=true."""
    url = os.environ.get("AUTOSLIM_TEST_POSTGRES_URL")
    if not url:
        reason = "AUTOSLIM_TEST_POSTGRES_URL is unset: no PostgreSQL server to test against (.ci/run starts one)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return url


def write_study(folder: Path, body: dict, **changes) -> Path:
    """``folder/<unique name>.yaml`` with ``body`` updated by ``changes``; the name is the study's."""
    raw = json.loads(json.dumps(body)) | changes
    path = folder / f"w{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_worker(study: Path, storage: str, *args: str, log: Path) -> subprocess.Popen:
    """``python -m autoslim optimize STUDY --storage STORAGE ARGS`` with its stderr (the progress) in ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "autoslim", "optimize", str(study), "--storage", storage, *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C works


def wait_all(procs: list[subprocess.Popen], *, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"workers still running after {timeout}s")
    return codes


def wait_for(load: Callable[[], optuna.Study], found: Callable[[FrozenTrial], bool], *,
             timeout: float = 120) -> FrozenTrial:
    """Poll the study until one of its trials satisfies ``found``; return it (``load`` should reuse one storage
    object: opening a storage per poll takes CPU from the workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            hit = next((t for t in load().get_trials(deepcopy=False) if found(t)), None)
        except Exception:  # the study may not exist yet
            hit = None
        if hit is not None:
            return hit
        time.sleep(0.1)
    raise AssertionError(f"no trial satisfied the condition within {timeout}s")


def checkpointed_mid_trial(trial: FrozenTrial, *, last_epoch: int) -> bool:
    """Running, with an epoch checkpoint written by itself, and epochs still to go."""
    ck = trial.user_attrs.get("checkpoint") or {}
    return (trial.state == TrialState.RUNNING and ck.get("trial") == trial.number
            and 1 <= ck.get("epoch", 0) <= last_epoch and "worker" in trial.user_attrs)


def trained_epochs(log: str, number: int) -> list[int]:
    """The epochs a trial trained, from a worker's progress lines (``[trial N] epoch   K ...``)."""
    prefix = f"[trial {number}] epoch"
    return [int(line[len(prefix):].split()[0]) for line in log.splitlines() if line.startswith(prefix)]


def finished_snapshot(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.state, t.values, t.datetime_complete, json.dumps(t.user_attrs, sort_keys=True, default=str))
            for t in study.get_trials(deepcopy=False) if t.state.is_finished()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_proxy(proc: subprocess.Popen, port: int, *, log: Path | None = None) -> str:
    """The ``grpc://`` URL of the proxy that ``proc`` starts on ``port``, once it answers (within 60 s)."""
    from autoslim.storage import get_storage

    deadline = time.monotonic() + 60
    while True:
        try:
            get_storage(f"grpc://127.0.0.1:{port}")
            return f"grpc://127.0.0.1:{port}"
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the storage proxy did not start: {log.read_text()[-2000:] if log else ''}")


@contextlib.contextmanager
def storage_proxy(url: str, *, log: Path):
    """``autoslim storage-proxy URL`` on a free port of this machine; yields its ``grpc://`` URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoslim", "storage-proxy", url, "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        yield wait_for_proxy(proc, port, log=log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
