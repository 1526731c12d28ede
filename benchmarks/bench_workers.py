"""Workers on one study: trials per minute with 1 to 32 processes on a journal file, on PostgreSQL and through
Optuna's gRPC proxy in front of it; storage cost per trial; server connections; and a fault run.

The trials are tiny (LeNet-300-100 on 100 digits, 2 epochs) so that the storage,
not the training, is what is measured. Per-trial artifacts and checkpoints are
off in the throughput runs (their cost is measured separately, per epoch).

1. Throughput: for each storage and worker count, a fresh study of ``--trials``
   trials is run by that many ``optimize`` processes; trials per minute are
   counted from the first trial's start to the last one's end (process start-up
   excluded), with the wall time of the whole run beside them; the storage
   milliseconds per trial sum every worker's main-thread storage calls (idle
   polling for other workers' trials included), and the most connections
   PostgreSQL held to the database during the run come from ``pg_stat_activity``.
2. Storage overhead: in one process, the same trials on each storage with every
   storage call timed (main thread, outermost calls only: what a trial waits
   for), next to an in-memory storage; and the cost of one epoch checkpoint
   (write to the artifact store + the trial's user attr).
3. Fault run: ``--fault-workers`` real ``autoslim optimize`` processes on the last
   storage (the proxy when there is one), checkpointing to a folder; ``--kills``
   of them SIGKILLed at random moments while training a checkpointed trial; then
   counted: exactly n finished, none duplicated (slots, seeds), every killed trial
   retried and resumed from its checkpoint, no orphaned files.

    python benchmarks/bench_workers.py [--postgres URL] [--trials 48] [--workers 1 2 4 8 16 32]
        [--storages journal postgresql grpc] [--fault-workers 16] [--kills 4]

``--postgres`` defaults to ``$AUTOSLIM_TEST_POSTGRES_URL``; without either only the journal file is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import signal
import socket
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
from optuna.trial import TrialState

from autoslim.storage import get_storage

STUDY = {"data": {"name": "digits", "train_subset": 100}, "model": "lenet300_100",
         "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
         "train": {"epochs": 1, "batch_size": 50}, "warm_start": False, "sampler": {"name": "random"},
         "recovery": {"checkpoint": False}}
MADE: list[str] = []  # the studies this run made (deleted from PostgreSQL at the end)


def worker(study_file: str, storage: str, timing: str) -> None:
    """One benchmark worker: ``autoslim optimize`` without per-trial artifacts; its main thread's storage calls are
    timed and written to ``timing`` (JSON: seconds, calls)."""
    import autoslim.study
    from autoslim.config import load_study

    timers = []

    def timed_storage(url):
        backend = get_storage(url)
        names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
        timers.append(CallTimer(backend, [n for n in names if callable(getattr(backend, n, None))]))
        return backend

    autoslim.study.open_artifact_store = lambda *a, **k: None
    autoslim.study.get_storage = timed_storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        autoslim.study.optimize(load_study(study_file), storage=storage, log=lambda s: None)
    finally:
        Path(timing).write_text(json.dumps({"seconds": sum(t.seconds for t in timers),
                                            "calls": sum(n for t in timers for n, _ in t.by_name.values())}))


class Connections:
    """The most connections PostgreSQL held to ``url``'s database (other than this poller's) while running."""

    def __init__(self, url: str | None) -> None:
        self.url, self.most = url, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            while not self._stop.wait(0.2):
                n = conn.execute(sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                                 "current_database() AND pid <> pg_backend_pid()")).scalar()
                self.most = max(self.most, n)

    def __enter__(self) -> "Connections":
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.url:
            self._thread.join()


def throughput(folder: Path, storage: str, *, workers: int, trials: int, postgres: str | None) -> dict:
    """Trials per minute (first start to last end), wall seconds of the whole run, storage ms per trial (every
    worker's main-thread calls, idle polling included), and the most server connections held."""
    name = f"bench{uuid.uuid4().hex[:8]}"
    MADE.append(name)
    study_file = folder / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "n_trials": trials}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timings = [folder / f"{name}-{k}.json" for k in range(workers)]
    start = time.perf_counter()
    with Connections(postgres) as connections:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(study_file), storage, str(t)], env=env)
                 for t in timings]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit(f"a worker failed on {storage}")
    wall = time.perf_counter() - start
    done = optuna.load_study(study_name=name, storage=get_storage(storage)).get_trials(deepcopy=False)
    assert len(done) == trials and all(t.state.is_finished() for t in done), "the study must hold exactly n trials"
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    storage_s = sum(json.loads(t.read_text())["seconds"] for t in timings)
    return {"rate": 60 * trials / span, "wall": wall, "storage_ms": 1000 * storage_s / trials,
            "connections": connections.most if postgres else None}


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


def overhead(folder: Path, storage: str | None, *, trials: int) -> tuple[float, float, str]:
    """(storage ms, wall ms) per trial of ``trials`` trials in this process, and the costliest calls."""
    from autoslim.config import load_study
    from autoslim.data import load_data
    from autoslim.distributed import run_worker
    from autoslim.recover import top_up
    from autoslim.search.objective import Objective
    from autoslim.study import check_study

    study_file = folder / f"overhead{uuid.uuid4().hex[:8]}.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "n_trials": trials}))
    cfg = load_study(study_file)
    MADE.append(cfg.name)
    data = load_data(cfg.data)
    spaces = check_study(cfg)
    backend = optuna.storages.InMemoryStorage() if storage is None else get_storage(storage)
    names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
    calls = CallTimer(backend, [n for n in names if callable(getattr(backend, n, None))])
    study = optuna.create_study(storage=backend, study_name=cfg.name, directions=["maximize", "minimize"])
    start = time.perf_counter()
    top_up(study, trials)
    run_worker(study, Objective(cfg, data, spaces, log=lambda s: None), n_trials=trials, stale_after=120,
               log=lambda s: None)
    wall = time.perf_counter() - start
    top = sorted(calls.by_name.items(), key=lambda kv: -kv[1][1])[:3]
    costliest = ", ".join(f"{name} {n / trials:.0f}x {1000 * sec / n:.1f} ms" for name, (n, sec) in top)
    return 1000 * calls.seconds / trials, 1000 * wall / trials, costliest


def checkpoint_ms(folder: Path, storage: str, *, epochs: int = 20) -> float:
    """Milliseconds to write one epoch checkpoint of the benchmark model (artifact + user attr)."""
    from autoslim.checkpoint import Checkpointer, TrialCheckpoints
    from autoslim.config import DataConfig, TrainConfig
    from autoslim.data import load_data
    from autoslim.methods import TrialContext
    from autoslim.models import create_model

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


FAULT_STUDY = {**STUDY, "data": {"name": "digits", "train_subset": 400}, "train": {"epochs": 3, "batch_size": 16},
               "methods": {"trimming": {"rounds": 1, "retrain_epochs": 2, "apoz_examples": 100}},
               "recovery": {"heartbeat_interval": 2, "grace_period": 10, "checkpoint": True}}


def fault_run(folder: Path, storage: str, *, workers: int, trials: int, kills: int, seed: int = 0) -> dict:
    """``workers`` real ``autoslim optimize`` processes checkpointing to a folder; ``kills`` of them SIGKILLed at
    random moments while they train a checkpointed trial; then the study and the folder are counted."""
    name = f"fault{uuid.uuid4().hex[:8]}"
    MADE.append(name)
    artifacts = folder / f"{name}-artifacts"
    study_file = folder / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump({**FAULT_STUDY, "n_trials": trials, "artifact_store": str(artifacts)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for k in range(workers):
        proc = subprocess.Popen([sys.executable, "-m", "autoslim", "optimize", str(study_file), "--storage", storage,
                                 "--quiet"], env=env, stdout=subprocess.DEVNULL,
                                stderr=(folder / f"{name}-{k}.log").open("w"))
        procs[proc.pid] = proc
    backend, rng, killed = get_storage(storage), random.Random(seed), {}
    start = time.perf_counter()
    while len(killed) < kills and any(p.poll() is None for p in procs.values()):
        time.sleep(rng.uniform(1, 4))
        try:
            running = optuna.load_study(study_name=name, storage=backend).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # not created yet
            continue
        candidates = [t for t in running if (t.user_attrs.get("checkpoint") or {}).get("trial") == t.number
                      and int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1]) in procs]
        candidates = [t for t in candidates if procs[int(t.user_attrs["worker"].rsplit(":", 1)[1])].poll() is None]
        if candidates:
            victim = rng.choice(candidates)
            pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed[victim.number] = victim.user_attrs["checkpoint"]["epoch"]
    codes = [p.wait() for pid, p in procs.items()]
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=backend)
    all_trials = study.get_trials(deepcopy=False)
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    slots = [t.system_attrs.get("autoslim:slot") for t in finished]
    retries = {t.system_attrs["failed_trial"]: t for t in all_trials if "failed_trial" in t.system_attrs}
    resumed = [n for n in killed if n in retries and (retries[n].user_attrs.get("resumed_from") or {}).get("trial") == n]
    referenced = {m.artifact_id for t in all_trials for m in optuna.artifacts.get_all_artifact_meta(t, storage=backend)}
    files = {f.name for f in artifacts.iterdir()} if artifacts.exists() else set()
    return {"wall": wall, "finished": len(finished), "complete": sum(t.state == TrialState.COMPLETE for t in finished),
            "duplicated slots": len(slots) - len(set(slots)),
            "duplicated seeds": len(finished) - len({t.user_attrs["config"]["seed"] for t in finished}),
            "killed": len(killed), "retried": sum(n in retries for n in killed), "resumed": len(resumed),
            "orphaned files": len(files - referenced), "checkpoint files left": sum(f.startswith("checkpoint-")
                                                                                      for f in files),
            "survivor exit codes": sorted({c for c in codes if c != -signal.SIGKILL}),
            "failed trials": sum(t.state == TrialState.FAIL for t in all_trials)}


@contextlib.contextmanager
def storage_proxy(url: str, folder: Path):
    """``autoslim storage-proxy URL`` on a free port; yields its grpc:// URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "autoslim", "storage-proxy", url, "--port", str(port)],
                            stdout=(folder / "proxy.log").open("w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                get_storage(f"grpc://127.0.0.1:{port}")
                break
            except Exception:
                time.sleep(0.5)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--postgres", default=os.environ.get("AUTOSLIM_TEST_POSTGRES_URL"),
                    help="a PostgreSQL URL (default: $AUTOSLIM_TEST_POSTGRES_URL)")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                    help="worker counts of the throughput runs (none: only the other parts)")
    ap.add_argument("--storages", nargs="+", default=["journal", "postgresql", "grpc"],
                    choices=["journal", "postgresql", "grpc"])
    ap.add_argument("--fault-workers", type=int, default=16, help="workers of the fault run (0: no fault run)")
    ap.add_argument("--fault-trials", type=int, default=32)
    ap.add_argument("--kills", type=int, default=4, help="workers SIGKILLed in the fault run")
    ap.add_argument("--skip-overhead", action="store_true", help="skip the one-process storage cost table")
    ap.add_argument("--worker", nargs=3, metavar=("STUDY", "STORAGE", "TIMING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # as each worker process (OMP_NUM_THREADS=1): cores shared by workers, not threads
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        storages = {}
        if "journal" in args.storages:
            storages["journal file"] = lambda: str(folder / f"j{uuid.uuid4().hex[:8]}.journal")
        if args.postgres and "postgresql" in args.storages:
            storages["postgresql"] = lambda: args.postgres
        if args.postgres and "grpc" in args.storages:
            proxy = stack.enter_context(storage_proxy(args.postgres, folder))
            storages["grpc proxy"] = lambda: proxy
        print(f"{args.trials} tiny trials per run, {os.cpu_count()} CPU cores; per storage: trials/min (first start "
              "to last end), [wall s of the whole run], storage ms per trial (all workers' calls, idle polling "
              "included), most PostgreSQL connections held\n")
        print(f"{'workers':>8} " + "".join(f"{name:>36}" for name in storages), flush=True)
        for w in args.workers:
            cells = [throughput(folder, make(), workers=w, trials=args.trials,
                                postgres=None if name == "journal file" else args.postgres)
                     for name, make in storages.items()]
            print(f"{w:>8} " + "".join(f"{c['rate']:>9.0f} [{c['wall']:6.1f} s] {c['storage_ms']:7.1f} ms "
                                       f"{'-' if c['connections'] is None else c['connections']:>4}" for c in cells),
                  flush=True)
        if not args.skip_overhead:
            print(f"\nstorage cost per trial (one worker in this process, {args.trials} trials; ms):")
            print(f"{'storage':>14} {'storage calls':>14} {'wall/trial':>11} {'vs memory':>10} {'checkpoint/epoch':>17}")
            overhead(folder, None, trials=4)  # warm up (first-call costs of torch and the data)
            base = overhead(folder, None, trials=args.trials)
            print(f"{'in-memory':>14} {base[0]:>14.1f} {base[1]:>11.1f} {'':>10} {'':>17}")
            costliest = {}
            for name, make in storages.items():
                url = make()
                calls, wall, costliest[name] = overhead(folder, url, trials=args.trials)
                print(f"{name:>14} {calls:>14.1f} {wall:>11.1f} {wall - base[1]:>+10.1f} "
                      f"{checkpoint_ms(folder, url):>17.1f}", flush=True)
            for name, text in costliest.items():
                print(f"  {name}: per trial {text}")
        if args.fault_workers:
            name, make = list(storages.items())[-1]
            result = fault_run(folder, make(), workers=args.fault_workers, trials=args.fault_trials, kills=args.kills)
            print(f"\nfault run on {name}: {args.fault_workers} workers, {args.fault_trials} trials, "
                  f"{args.kills} SIGKILLs at random:")
            print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
            ok = (result["finished"] == args.fault_trials and result["duplicated slots"] == 0
                  and result["duplicated seeds"] == 0 and result["resumed"] == result["killed"]
                  and result["orphaned files"] == 0)
            print(f"  {'PASS' if ok else 'FAIL'}: exactly n finished, none duplicated, every killed trial resumed "
                  "from its checkpoint, no orphaned files")
    if args.postgres:  # leave the server as it was
        storage = optuna.storages.RDBStorage(args.postgres)
        for name in set(optuna.get_all_study_names(storage)) & set(MADE):
            optuna.delete_study(study_name=name, storage=storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
