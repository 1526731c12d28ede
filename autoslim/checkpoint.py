"""Per-epoch trial checkpoints, and resuming a trial from one.

A trial whose worker died is retried as a new trial with the same parameters
(by another worker once its heartbeat is stale, or by ``autoslim recover``,
:mod:`autoslim.recover`); the retry resumes from the dead trial's last
checkpoint instead of starting over.

**What is saved.** After every epoch, :class:`Checkpointer` writes one file
(:func:`torch.save`, loadable with ``weights_only=True``) holding

- ``phases``: for every training phase the method has finished (a method
  trains in phases with surgery in between: train, prune, retrain, ...), its
  name, the model's architecture spec (:func:`autoslim.surgery.architecture_spec`)
  and weights at the phase end, the parameters of the phase's extra optimizers
  (tensors outside the model, such as SSS's scaling factors), the RNG states
  (Python, NumPy, torch) and the phase's epoch records;
- ``current``: the same for the phase in progress after its last epoch, plus
  the fit's loop state (``loop``: epochs done, the state the fit passed, for
  autoslim's loop its step, optimizer and schedule states and the shuffling
  generator, and the extra optimizers' states). A phase trained by a ``fit``
  (:mod:`autoslim.fit`) that takes no ``resume`` is checkpointed at its end
  only (``current`` is None): its loop state is its own; a retry redoes that
  phase from its start.

**Resuming.** The method runs again from the start with the same parameters
and seed. :class:`~autoslim.methods.TrialContext` hands every phase to
:meth:`Checkpointer.phase`, which counts phases: a phase the checkpoint had
finished is *replayed without training* (the saved weights, extra
parameters and RNG states are loaded, its records restored), so the method's
surgery between phases sees the same weights and takes the same decisions;
the phase in progress loads its state and trains only its remaining epochs;
later phases train as usual. Surgery is deterministic given the weights; if
a rebuilt model does not match the saved architecture spec (another machine
took another branch), :class:`CheckpointMismatch` is raised and the trial
starts over (:func:`run_resumable`). On one machine a resumed trial ends with
exactly the weights of an uninterrupted one.

**Where.** In the study's Optuna artifact store (:mod:`autoslim.artifacts`,
``x-artifacts/`` beside a file storage, or ``--artifact-store``: a folder or
``s3://bucket/prefix``), written with
the store's own ``write``/``open_reader``/``remove``; the trial's user attr
``checkpoint`` names the latest (artifact id, epoch, phase, time). A new
checkpoint gets a new id and replaces the previous one only once written, so a
worker killed while writing leaves the previous checkpoint intact. Before a
file is written, the user attr ``checkpoint_pending`` records its id and the
id it replaces, so a worker killed at any point between writing the new file
and removing the old one leaves no file that its retry does not know about.
Checkpoints are working state, not results: they are not registered as the
trial's artifacts, and are removed when the trial finishes (completed, pruned
or failed), with any its dead predecessor left behind. A retry inherits the
user attrs and so finds its predecessor's files.
"""

from __future__ import annotations

import datetime
import io
import random
import uuid
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import optuna
import torch
from torch import nn

from optuna.artifacts._protocol import ArtifactStore

from autoslim.errors import load_error
from autoslim.surgery import architecture_spec

FORMAT = "autoslim-checkpoint-2"  # 2: the loop state is a fit's (autoslim.train.run_fit)
T = TypeVar("T")


class CheckpointMismatch(RuntimeError):
    """A checkpoint does not fit the trial being resumed (another phase or architecture at this point)."""


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) RNG states, as tensors and numbers only.

    >>> state = rng_state(); a = torch.rand(1); set_rng_state(state); torch.equal(a, torch.rand(1))
    True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _extra_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [p for o in optimizers for g in o.param_groups for p in g["params"]]


class Checkpointer:
    """Checkpoints every epoch of a trial's phases through ``save``; resumes from ``resume`` (a saved checkpoint).

    >>> from autoslim.config import DataConfig, TrainConfig
    >>> from autoslim.data import load_data
    >>> from autoslim.methods import TrialContext
    >>> from autoslim.models import create_model
    >>> data, saved = load_data(DataConfig(name="digits", train_subset=100)), []
    >>> ctx = TrialContext(data=data, train_config=TrainConfig(epochs=2), checkpointer=Checkpointer(save=saved.append))
    >>> _ = ctx.train(create_model("lenet300_100", in_shape=data.in_shape, num_classes=10))
    >>> [c["current"]["loop"]["epoch"] for c in saved]
    [1, 2]
    """

    def __init__(self, *, save: Callable[[dict], None], resume: Mapping[str, Any] | None = None) -> None:
        self._save = save
        self._phases: list[dict] = []  # snapshots of the phases finished in this run
        self._saved = [] if resume is None else [*resume["phases"], *([resume["current"]] if resume["current"] else [])]

    def phase(self, run: Callable[..., list[dict]], *, model: nn.Module, name: str,
              extra_optimizers: Sequence[torch.optim.Optimizer] = (), resumable: bool = True) -> list[dict]:
        """Run one training phase (``run``: a fit, :class:`autoslim.fit.UserFit`, with its arguments bound).

        A ``resumable`` run (a fit that takes ``resume``: autoslim's loop, or a user's) takes ``resume`` and
        ``on_state`` and is checkpointed after every epoch; another is called bare and checkpointed at its end
        only: a retry redoes the phase in progress from its start."""
        index = len(self._phases)
        extra = _extra_params(extra_optimizers)
        saved = self._saved[index] if index < len(self._saved) else None
        done: list[dict] = []
        if saved is not None:
            self._restore(saved, model=model, name=name, extra=extra)
            done = [dict(r) for r in saved["history"]]
        if saved is not None and "loop" in saved and not resumable:
            raise CheckpointMismatch(f"phase {index + 1} ({name!r}) of the checkpoint stopped within a resumable "
                                     "fit; this run trains it with a fit that takes no resume")
        if saved is None or "loop" in saved:
            if resumable:
                records = run(resume=saved["loop"] if saved is not None else None,
                              on_state=lambda history, loop: self._save(self._payload(
                                  index, name, model, extra, done + history, loop)))
            else:
                records = run()
            done = done + records
        self._phases.append(self._snapshot(index, name, model, extra, done))
        if saved is None and not resumable:
            self._save({"format": FORMAT, "phases": list(self._phases), "current": None})
        return done

    @staticmethod
    def _restore(saved: Mapping[str, Any], *, model: nn.Module, name: str, extra: list[torch.Tensor]) -> None:
        where = f"phase {saved['index'] + 1} ({saved['phase']!r})"
        if saved["phase"] != name:
            raise CheckpointMismatch(f"{where} of the checkpoint is {name!r} in this run")
        if architecture_spec(model) != saved["spec"]:
            raise CheckpointMismatch(f"the model entering {where} differs from the checkpoint's architecture")
        if [tuple(p.shape) for p in extra] != [tuple(t.shape) for t in saved["extra"]]:
            raise CheckpointMismatch(f"the extra parameters of {where} differ from the checkpoint's")
        model.load_state_dict(saved["model"])
        with torch.no_grad():
            for p, t in zip(extra, saved["extra"]):
                p.copy_(t)
        set_rng_state(saved["rng"])

    @staticmethod
    def _snapshot(index: int, name: str, model: nn.Module, extra: list[torch.Tensor], history: list[dict]) -> dict:
        return {"index": index, "phase": name, "spec": architecture_spec(model),
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "extra": [p.detach().cpu().clone() for p in extra], "rng": rng_state(),
                "history": [dict(r) for r in history]}

    def _payload(self, index: int, name: str, model: nn.Module, extra: list[torch.Tensor], history: list[dict],
                 loop: dict) -> dict:
        return {"format": FORMAT, "phases": self._phases,
                "current": {**self._snapshot(index, name, model, extra, history), "loop": loop}}


def epochs_in(checkpoint: Mapping[str, Any]) -> int:
    """The number of epochs trained before ``checkpoint`` was written.

    >>> epochs_in({"phases": [{"history": [{}, {}]}], "current": {"history": [{}]}})
    3
    """
    current = checkpoint["current"] or {"history": []}
    return sum(len(p["history"]) for p in checkpoint["phases"]) + len(current["history"])


def read_checkpoint(stream: io.BufferedIOBase | str, *, what: str = "checkpoint") -> dict:
    """The checkpoint in a file or stream (``torch.load(weights_only=True)``); ValueError naming the problem."""
    try:
        saved = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} cannot be read: {load_error(e)}") from None
    found = saved.get("format") if isinstance(saved, dict) else None
    if isinstance(found, str) and found.startswith("autoslim-checkpoint-") and found != FORMAT:
        raise ValueError(f"{what} was written by another autoslim version (format {found!r}; this one reads "
                         f"{FORMAT!r})")
    if found != FORMAT:
        raise ValueError(f"{what} is not an autoslim checkpoint (expected format {FORMAT!r})")
    return saved


class TrialCheckpoints:
    """The latest checkpoint of ``trial`` in ``store``; the trial's user attr ``checkpoint`` points to it.

    Every checkpoint file of the trial (and of the trials it retries) that may
    exist is the latest or is listed in the user attr ``checkpoint_pending``;
    :meth:`discard` removes them all.

    >>> checkpoints = TrialCheckpoints(trial, store=store)  # doctest: +SKIP
    >>> checkpoints.save(payload); checkpoints.load()["format"]  # doctest: +SKIP
    'autoslim-checkpoint-2'
    """

    def __init__(self, trial: optuna.Trial, *, store: ArtifactStore) -> None:
        self.trial, self.store = trial, store
        self.latest: dict | None = trial.user_attrs.get("checkpoint")
        # Files a dead predecessor may have left: being written, or replaced but not yet removed.
        inherited = trial.user_attrs.get("checkpoint_pending") or ()
        self.pending: set[str] = set(inherited) - {self._latest_id()}
        self._recorded = bool(inherited)  # the user attr checkpoint_pending is set

    def _latest_id(self) -> str | None:
        return self.latest["artifact_id"] if self.latest else None

    def load(self) -> dict | None:
        """The checkpoint the trial (or the trial it retries) wrote last; None if none; ValueError if unreadable."""
        if not self.latest:
            return None
        what = f"checkpoint {self.latest['artifact_id']} of trial {self.latest['trial']}"
        try:
            with self.store.open_reader(self.latest["artifact_id"]) as f:
                return read_checkpoint(io.BytesIO(f.read()), what=what)
        except optuna.artifacts.exceptions.ArtifactNotFound:
            raise ValueError(f"{what} is not in the artifact store") from None

    def save(self, payload: dict) -> None:
        """Write ``payload`` under a new artifact id, point the user attr at it, then drop the previous one.

        The new id and the one it replaces are recorded as pending first, so a
        kill between any two of these steps leaves no file unaccounted for.
        """
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        buffer.seek(0)
        artifact_id = f"checkpoint-{uuid.uuid4().hex}"
        self.pending |= {artifact_id, self._latest_id()} - {None}
        self.trial.set_user_attr("checkpoint_pending", sorted(self.pending))
        self._recorded = True
        self.store.write(artifact_id, buffer)
        self.latest = {
            "artifact_id": artifact_id, "trial": self.trial.number, "epoch": epochs_in(payload),
            "phase": (payload["current"] or payload["phases"][-1])["phase"],
            "saved_at": datetime.datetime.now().isoformat(timespec="seconds")}
        self.trial.set_user_attr("checkpoint", self.latest)
        self.pending.discard(artifact_id)
        self._remove_pending()

    def discard(self) -> None:
        """Remove the latest checkpoint and any pending file (the trial has finished)."""
        latest, self.latest = self._latest_id(), None
        if latest:
            self.trial.set_user_attr("checkpoint", None)
            self.pending.add(latest)
        self._remove_pending()
        if self._recorded:
            self.trial.set_user_attr("checkpoint_pending", None)
            self._recorded = False

    def _remove_pending(self) -> None:
        for artifact_id in sorted(self.pending):
            try:
                self.store.remove(artifact_id)
            except optuna.artifacts.exceptions.ArtifactNotFound:
                pass
        self.pending.clear()


def run_resumable(run: Callable[[Checkpointer | None], T], checkpoints: TrialCheckpoints | None, *,
                  log: Callable[[str], None] = lambda s: None) -> T:
    """``run(checkpointer)``, resuming from the trial's checkpoint where it has one; finished: checkpoint removed.

    An unreadable or mismatching checkpoint is reported on one line and the trial
    starts over. The checkpoint is kept only if ``run`` is interrupted
    (``KeyboardInterrupt``), its process dies, or the trial is failed under it
    (Optuna refuses to update it: :mod:`autoslim.heartbeat`), so that a retry resumes.

    >>> result = run_resumable(lambda ck: run_trial(config, data=data, checkpointer=ck), checkpoints)  # doctest: +SKIP
    """
    if checkpoints is None:
        return run(None)
    try:
        result = _resume_or_start(run, checkpoints, log=log)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise  # failed under this worker: its retry owns the checkpoint files now
    except Exception:
        checkpoints.discard()
        raise
    try:
        checkpoints.discard()
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # failed under this worker once trained: the caller hands the result over, and the files with it
    return result


def _resume_or_start(run: Callable[[Checkpointer | None], T], checkpoints: TrialCheckpoints, *,
                     log: Callable[[str], None]) -> T:
    try:
        resume = checkpoints.load()
    except ValueError as e:
        log(f"cannot resume: {e}; starting over")
        resume = None
    if resume is not None:
        source = checkpoints.latest
        checkpoints.trial.set_user_attr("resumed_from", {"trial": source["trial"], "epoch": epochs_in(resume)})
        log(f"resuming trial {source['trial']} from its checkpoint after epoch {epochs_in(resume)} "
            f"(phase {source['phase']}; {len(resume['phases'])} finished phase(s) replayed without training)")
        try:
            return run(Checkpointer(save=checkpoints.save, resume=resume))
        except CheckpointMismatch as e:
            log(f"cannot resume: {e}; starting over")
            checkpoints.trial.set_user_attr("resumed_from", None)
    return run(Checkpointer(save=checkpoints.save))
