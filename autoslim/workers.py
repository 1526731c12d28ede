"""``autoslim optimize STUDY --workers N [--devices ...]``: N local worker processes on one storage.

Each worker is an ordinary ``autoslim optimize`` process (the same command
without ``--workers``), so it has exactly the guarantees of workers started by
hand: they share the study through its storage and finish exactly ``n_trials``
(:mod:`autoslim.distributed`). This module only starts them and watches them:

- **devices**: ``--devices cuda:0,cuda:1`` gives worker ``k`` the ``k``-th device
  of the list (round robin when there are more workers than devices), ``auto``
  every visible GPU (else the CPU), ``cpu`` the CPU. A GPU worker sees only its
  GPU (``CUDA_VISIBLE_DEVICES``) and runs with ``--device cuda``;
- **threads**: N workers on C cores get ``max(1, C // N)`` torch threads each
  (``OMP_NUM_THREADS``), so they do not fight over the cores;
- **one view**: every line a worker prints comes out prefixed by its worker
  (``[w2] [trial 7] epoch 3 ...``), and a summary line follows each finished trial;
- **Ctrl-C** stops them all: each worker gets SIGINT, fails and requeues its
  running trial (its retry resumes from the trial's checkpoint on the next run)
  and exits; the exit code is 130. Otherwise it is 0 when every worker exited 0,
  else the first non-zero exit code of a worker.

A SQLite file cannot be shared by processes (its writers lock each other out):
``--workers`` above 1 with a SQLite storage is refused in one line naming what to
use instead, a journal file or an RDB URL.

>>> parse_devices("cuda:0,cuda:1", workers=3, gpus=2)
['cuda:0', 'cuda:1', 'cuda:0']
>>> parse_devices("auto", workers=2, gpus=0)
['cpu', 'cpu']
>>> threads_per_worker(workers=3, cores=16)
5
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Callable, Sequence

from autoslim.errors import UsageError

DONE = re.compile(r"^\[trial (\d+)\] (done in|pruned|failed)")


def parse_devices(text: str, *, workers: int, gpus: int) -> list[str]:
    """The device of each of ``workers`` workers from ``--devices`` (``gpus``: how many GPUs are visible)."""
    if text == "auto":
        devices = [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    else:
        devices = [d.strip() for d in text.split(",")]
        for d in devices:
            match = re.fullmatch(r"cpu|cuda:(\d+)", d)
            if not match:
                raise UsageError(f"--devices: {d!r} is not a device; accepted: auto, cpu, or cuda:K,... "
                                 "(e.g. cuda:0,cuda:1)")
            if match.group(1) is not None and int(match.group(1)) >= gpus:
                seen = ", ".join(f"cuda:{i}" for i in range(gpus)) or "none"
                raise UsageError(f"--devices: {d} is not visible here; visible GPUs: {seen}")
    return [devices[k % len(devices)] for k in range(workers)]


def threads_per_worker(*, workers: int, cores: int) -> int:
    """Torch threads for each of ``workers`` workers sharing ``cores`` cores."""
    return max(1, cores // workers)


def check_shareable(url: str, *, workers: int) -> None:
    """Refuse ``workers`` > 1 on a storage that processes cannot share (SQLite), in one line."""
    if workers > 1 and url.startswith("sqlite"):
        raise UsageError(f"--workers: {workers} processes cannot share the SQLite storage {url}; use a journal "
                         "file (--storage x.journal) or an RDB URL (--storage postgresql://...)")


def worker_command(argv: Sequence[str], device: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment changes of one worker: ``autoslim optimize ARGV --device ...``."""
    if device == "cpu":
        return [*argv, "--device", "cpu"], {}
    return [*argv, "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": device.split(":")[1]}


class Workers:
    """N worker processes running ``python -m autoslim optimize ARGV``, their output in one view.

    >>> Workers(["studies/x.yaml", "--storage", "x.journal"], devices=["cpu", "cpu"]).run()  # doctest: +SKIP
    0
    """

    def __init__(self, argv: Sequence[str], *, devices: Sequence[str], n_trials: int | None = None,
                 cores: int | None = None, log: Callable[[str], None] = print) -> None:
        self.argv, self.devices, self.n_trials, self.log = list(argv), list(devices), n_trials, log
        self.threads = threads_per_worker(workers=len(devices), cores=cores or os.cpu_count() or 1)
        self.finished: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for k, device in enumerate(self.devices):
            args, env = worker_command(self.argv, device)
            env = {**os.environ, **env, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            proc = subprocess.Popen([sys.executable, "-m", "autoslim", "optimize", *args], env=env, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=1,
                                    start_new_session=True,  # Ctrl-C reaches the parent only; it forwards it
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            self.procs.append(proc)
            self.log(f"[w{k}] started (pid {proc.pid}, {device}, {self.threads} thread(s))")
        self._readers = [threading.Thread(target=self._relay, args=(k, p), daemon=True)
                         for k, p in enumerate(self.procs)]
        for reader in self._readers:
            reader.start()

    def _relay(self, k: int, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                self.log(f"[w{k}] {line}")
                match = DONE.match(line)
                if match:
                    self.finished[match.group(2).split()[0]] += 1
                    self.log(f"[all] {self.summary()}")

    def summary(self) -> str:
        """One line: trials done, pruned and failed in this run, by all workers together."""
        done, pruned, failed = self.finished["done"], self.finished["pruned"], self.finished["failed"]
        target = f" (study target: {self.n_trials} finished)" if self.n_trials else ""
        return (f"{done + pruned} trial(s) finished in this run by {len(self.procs)} workers: {done} completed, "
                f"{pruned} pruned, {failed} failed{target}")

    def wait(self) -> list[int]:
        codes = [p.wait() for p in self.procs]
        for reader in self._readers:
            reader.join()
        return codes

    def interrupt(self) -> list[int]:
        """SIGINT to every worker still running (each requeues its trial), then wait for all of them."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        return self.wait()

    def run(self) -> int:
        """Start the workers and wait for them; the exit code (130 after Ctrl-C)."""
        try:
            self.start()
            codes = self.wait()
        except KeyboardInterrupt:
            self.log("[all] interrupted: stopping every worker; their running trials are requeued")
            while True:
                try:
                    self.interrupt()
                    break
                except KeyboardInterrupt:  # a second Ctrl-C while they requeue: keep waiting for them
                    continue
            return 130
        failed = [(k, c) for k, c in enumerate(codes) if c != 0]
        self.log(f"[all] {self.summary()}; " + ("every worker exited normally" if not failed else
                                                 ", ".join(f"w{k} exited with code {c}" for k, c in failed)))
        code = failed[0][1] if failed else 0
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
