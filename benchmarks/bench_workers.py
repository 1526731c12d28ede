"""Trials per minute with 1, 2 and 4 worker processes on a journal file and on PostgreSQL, and storage cost per trial.

The trials are tiny (LeNet-300-100 on 100 digits, 2 epochs) so that the storage,
not the training, is what is measured. Per-trial artifacts and checkpoints are
off in the worker runs (their cost is measured separately, per epoch).

1. Throughput: for each storage and worker count, a fresh study of ``--trials``
   trials is run by that many ``optimize`` processes; trials per minute are
   counted from the first trial's start to the last one's end (process start-up
   excluded), with the wall time of the whole run beside them.
2. Storage overhead: in one process, the same trials on each storage with every
   storage call timed (main thread, outermost calls only: what a trial waits
   for), next to an in-memory storage; plus the study lock, and the cost of one
   epoch checkpoint (write to the artifact store + the trial's user attr).

    python benchmarks/bench_workers.py [--postgres URL] [--trials 24] [--workers 1 2 4]

``--postgres`` defaults to ``$AUTOSLIM_TEST_POSTGRES_URL``; without either only the journal file is measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import torch
import yaml

STUDY = {"data": {"name": "digits", "train_subset": 100}, "model": "lenet300_100",
         "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
         "train": {"epochs": 1, "batch_size": 50}, "warm_start": False, "sampler": {"name": "random"},
         "recovery": {"checkpoint": False}}
MADE: list[str] = []  # the studies this run made (deleted from PostgreSQL at the end)


def worker(study_file: str, storage: str) -> None:
    """One benchmark worker: ``autoslim optimize`` without per-trial artifacts."""
    import autoslim.study
    from autoslim.config import load_study

    autoslim.study.open_artifact_store = lambda *a, **k: None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    autoslim.study.optimize(load_study(study_file), storage=storage, log=lambda s: None)


def throughput(folder: Path, storage: str, *, workers: int, trials: int) -> tuple[float, float]:
    """(trials per minute between the first start and the last end, wall seconds of the whole run)."""
    name = f"bench{uuid.uuid4().hex[:8]}"
    MADE.append(name)
    study_file = folder / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "n_trials": trials}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(study_file), storage], env=env)
             for _ in range(workers)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a worker failed on {storage}")
    wall = time.perf_counter() - start
    from autoslim.storage import get_storage

    done = optuna.load_study(study_name=name, storage=get_storage(storage)).get_trials(deepcopy=False)
    assert len(done) == trials and all(t.state.is_finished() for t in done), "the study must hold exactly n trials"
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 60 * trials / span, wall


class CallTimer:
    """Times the outermost calls of an object's methods made on the main thread."""

    def __init__(self, obj, names) -> None:
        self.seconds, self._depth = 0.0, 0
        self.by_name: dict[str, list] = {}  # name: [outermost calls, seconds]
        for name in names:
            setattr(obj, name, self._wrap(getattr(obj, name)))

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    took = time.perf_counter() - start
                    self.seconds += took
                    entry = self.by_name.setdefault(fn.__name__, [0, 0.0])
                    entry[0], entry[1] = entry[0] + 1, entry[1] + took
        return timed


def overhead(folder: Path, storage: str | None, *, trials: int) -> tuple[float, float, float, str]:
    """(storage ms, study-lock ms, wall ms) per trial of ``trials`` trials in this process, and the costliest calls."""
    from autoslim.config import load_study
    from autoslim.data import load_data
    from autoslim.distributed import run_worker
    from autoslim.storage import FileLock, study_lock
    from autoslim.search.objective import Objective
    from autoslim.storage import get_storage
    from autoslim.study import check_study

    study_file = folder / f"overhead{uuid.uuid4().hex[:8]}.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "n_trials": trials}))
    cfg = load_study(study_file)
    MADE.append(cfg.name)
    data = load_data(cfg.data)
    spaces = check_study(cfg)
    if storage is None:
        backend, lock = optuna.storages.InMemoryStorage(), FileLock(folder / "memory.lock")
    else:
        backend = optuna.storages.get_storage(get_storage(storage, recovery=cfg.recovery))
        lock = study_lock(storage)
    names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")] + ["_get_stale_trial_ids"]
    calls = CallTimer(backend, [n for n in names if callable(getattr(backend, n, None))])
    locking = CallTimer(lock, ["acquire", "release"])
    study = optuna.create_study(storage=backend, study_name=cfg.name, directions=["maximize", "minimize"])
    heartbeat = storage is not None and "://" in storage
    start = time.perf_counter()
    run_worker(study, Objective(cfg, data, spaces, log=lambda s: None), n_trials=trials, lock=lock,
               heartbeat=heartbeat, log=lambda s: None)
    wall = time.perf_counter() - start
    top = sorted(calls.by_name.items(), key=lambda kv: -kv[1][1])[:3]
    costliest = ", ".join(f"{name} {n / trials:.0f}x {1000 * sec / n:.1f} ms" for name, (n, sec) in top)
    return 1000 * calls.seconds / trials, 1000 * locking.seconds / trials, 1000 * wall / trials, costliest


def checkpoint_ms(folder: Path, storage: str, *, epochs: int = 20) -> float:
    """Milliseconds to write one epoch checkpoint of the benchmark model (artifact + user attr)."""
    from autoslim.checkpoint import Checkpointer, TrialCheckpoints
    from autoslim.config import DataConfig, TrainConfig
    from autoslim.data import load_data
    from autoslim.methods import TrialContext
    from autoslim.models import create_model
    from autoslim.storage import get_storage

    store_dir = folder / f"artifacts{uuid.uuid4().hex[:8]}"
    store_dir.mkdir()
    MADE.append(f"ck{uuid.uuid4().hex[:8]}")
    study = optuna.create_study(storage=get_storage(storage), study_name=MADE[-1])
    trial = study.ask()
    checkpoints = TrialCheckpoints(trial, store=optuna.artifacts.FileSystemArtifactStore(store_dir))
    seconds = [0.0]

    def save(payload: dict) -> None:
        start = time.perf_counter()
        checkpoints.save(payload)
        seconds[0] += time.perf_counter() - start

    data = load_data(DataConfig(name="digits", train_subset=100))
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=epochs, batch_size=50),
                       checkpointer=Checkpointer(save=save))
    ctx.train(create_model("lenet300_100", in_shape=data.in_shape, num_classes=10))
    return 1000 * seconds[0] / epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--postgres", default=os.environ.get("AUTOSLIM_TEST_POSTGRES_URL"),
                    help="a PostgreSQL URL (default: $AUTOSLIM_TEST_POSTGRES_URL)")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--worker", nargs=2, metavar=("STUDY", "STORAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # as each worker process (OMP_NUM_THREADS=1): cores shared by workers, not threads
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        storages = {"journal file": lambda: str(folder / f"j{uuid.uuid4().hex[:8]}.journal")}
        if args.postgres:
            storages["postgresql"] = lambda: args.postgres
        print(f"{args.trials} tiny trials per run, {os.cpu_count()} CPU cores; "
              f"trials/min (first start to last end) and [wall s of the whole run]\n")
        print(f"{'workers':>8} " + "".join(f"{name:>24}" for name in storages))
        for w in args.workers:
            cells = [throughput(folder, make(), workers=w, trials=args.trials) for make in storages.values()]
            print(f"{w:>8} " + "".join(f"{rate:>14.0f} [{wall:5.1f} s]" for rate, wall in cells), flush=True)
        print(f"\nstorage cost per trial (one worker, {args.trials} trials; ms):")
        print(f"{'storage':>14} {'storage calls':>14} {'study lock':>11} {'wall/trial':>11} {'vs memory':>10} "
              f"{'checkpoint/epoch':>17}")
        overhead(folder, None, trials=4)  # warm up (first-call costs of torch and the data)
        base = overhead(folder, None, trials=args.trials)
        print(f"{'in-memory':>14} {base[0]:>14.1f} {base[1]:>11.1f} {base[2]:>11.1f} {'':>10} {'':>17}")
        costliest = {}
        for name, make in storages.items():
            url = make()
            calls, lock, wall, costliest[name] = overhead(folder, url, trials=args.trials)
            print(f"{name:>14} {calls:>14.1f} {lock:>11.1f} {wall:>11.1f} {wall - base[2]:>+10.1f} "
                  f"{checkpoint_ms(folder, url):>17.1f}", flush=True)
        for name, text in costliest.items():
            print(f"  {name}: per trial {text}")
    if args.postgres:  # leave the server as it was
        storage = optuna.storages.RDBStorage(args.postgres)
        for name in set(optuna.get_all_study_names(storage)) & set(MADE):
            optuna.delete_study(study_name=name, storage=storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
