"""The trained network a trial compresses: a study's base, trained once and shared, or the user's own weights.

Trimming and IHT compress a trained network, and so do l1/l2 and SSS with
``start: base`` (:meth:`autoslim.methods.TrialContext.pretrained`). Where that
network comes from is the study file's ``base:`` section
(:class:`autoslim.config.BaseConfig`), recorded in every trial's config:

- **shared** (the default): trained once, with the study's seed, for the study's
  ``train`` on its data, and reused by every trial whose model, ``model_kwargs``,
  ``model_adapt``, data, ``train`` and base seed are the same (:func:`base_key`, a hash of them).
  With an artifact store the weights are uploaded as one of the study's artifacts (``base-<key>.pt``) and the
  study's system attr ``autoslim:base:<key>`` names the artifact, so every worker
  on the storage reuses them; without one they are kept by the
  :class:`BaseNetworks` object (one study run in one process). Two workers that
  need the base before either has stored it both train it; the one that
  stores it first wins, and the other then loads that one (its own copy stays
  among the study's artifacts, unused). A base file that
  cannot be read (removed, corrupt) is trained again, with one line.
- **weights**: the user's state dict file; nothing trained. :func:`read_weights` checks it.
- **the model's own** (``train: false``): the model factory loads trained weights; nothing trained.
- **in the trial** (``share: false``): every trial trains its own, as a phase ``train``.

>>> from autoslim.config import BaseConfig, TrialConfig
>>> a = TrialConfig(method="trimming", base=BaseConfig(seed=0))
>>> b = TrialConfig(method="iht", params={"cycles": 2}, seed=7, base=BaseConfig(seed=0))
>>> base_key(a) == base_key(b), base_key(a) == base_key(TrialConfig(method="trimming", base=BaseConfig(seed=1)))
(True, False)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import optuna
import torch
from torch import nn

from autoslim.config import TrialConfig
from autoslim.data import Data
from autoslim.errors import UsageError, load_error
from autoslim.fit import resolve_loop
from autoslim.methods import TrialContext
from autoslim.models import create_model
from autoslim.train import Callback, seed_everything

ATTR_PREFIX = "autoslim:base:"  # study system attr: the shared base of one key


def base_key(config: TrialConfig) -> str:
    """A stable hash of what a shared base depends on: model, ``model_kwargs``, ``model_adapt``, data, ``train``
    and the base's seed (not the trial's seed, method or knobs)."""
    what = {"model": config.model, "model_kwargs": config.model_kwargs, "model_adapt": config.model_adapt,
            "data": dataclasses.asdict(config.data), "train": dataclasses.asdict(config.train),
            "seed": config.base.seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_weights(source: str | Path | io.BytesIO, *, what: str) -> dict[str, torch.Tensor]:
    """The state dict in ``source`` (``torch.load(weights_only=True)``, on the CPU); ValueError naming ``what``
    if it cannot be read or is not a mapping of names to tensors."""
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ValueError(f"{what}: {source} does not exist")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} cannot be read: {load_error(e)}") from None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{what} is not a state dict (a mapping of parameter names to tensors, "
                         "as torch.save(model.state_dict(), path) writes it)")
    return dict(state)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load ``state`` into ``model``; ValueError naming ``what`` and the first key or shape that does not match."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its keys missing (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys not in the model (first {unexpected[0]!r})")
    if shapes:
        problems.append(f"{shapes[0]!r} is {tuple(state[shapes[0]].shape)}, the model's {tuple(own[shapes[0]].shape)}")
    if problems:
        raise ValueError(f"{what} does not match {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state)


def check_user_weights(model: nn.Module, path: str, *, field: str = "base.weights") -> dict[str, torch.Tensor]:
    """The user's weights file ``path`` read and loaded into ``model``; one UsageError line naming ``field``."""
    try:
        state = read_weights(path, what=f"{field}: {path}")
        load_weights(model, state, what=f"{field}: {path}")
    except ValueError as e:
        raise UsageError(f"{e}; accepted: a state dict of the study's model, saved with "
                         "torch.save(model.state_dict(), path)") from None
    return state


def stored_bases(study: optuna.Study) -> dict[str, dict]:
    """The shared bases stored for ``study``: by key, the artifact id and how the base was trained."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {k[len(ATTR_PREFIX):]: v for k, v in attrs.items() if k.startswith(ATTR_PREFIX)}


class BaseNetworks:
    """The trained networks the trials of one study start from (see the module doc), kept for reuse.

    ``study`` and ``artifact_store``: where a shared base is stored for every worker (both needed, else it is
    kept by this object only).

    >>> bases = BaseNetworks()  # doctest: +SKIP
    >>> bases.load_into(model, config, data=data)  # doctest: +SKIP
    {'source': 'shared', 'key': '…', 'epochs': 6, 'trained': True}
    """

    def __init__(self, *, study: optuna.Study | None = None, artifact_store=None) -> None:
        self.study, self.store = study, artifact_store
        self._states: dict[str, tuple[str | None, dict[str, torch.Tensor]]] = {}  # key -> (artifact id, weights)

    def load_into(self, model: nn.Module, config: TrialConfig, *, data: Data, log: Callable[[str], None] = print,
                  callbacks: Sequence[Callback] = ()) -> dict:
        """Give ``model`` the weights of ``config.base``; return how they were obtained (a trial's
        ``info["base"]``). A shared base not yet trained is trained here, ``callbacks`` seeing its epochs."""
        base = config.base
        if base.weights is not None:
            state = self._states.get(base.weights, (None, None))[1] or check_user_weights(
                create_model(config.model, in_shape=data.in_shape, num_classes=data.num_classes,
                             adapt=config.model_adapt, **config.model_kwargs), base.weights)
            self._states[base.weights] = (None, state)
            model.load_state_dict(state)
            log(f"base: the weights of {base.weights}")
            return {"source": "weights", "weights": base.weights}
        if not base.train:
            log(f"base: the weights model {config.model} loads itself (base.train: false)")
            return {"source": "model"}
        key = base_key(config)
        artifact_id, state, trained = self._shared(key, config, data=data, log=log, callbacks=callbacks)
        model.load_state_dict(state)
        return {"source": "shared", "key": key, "epochs": config.train.epochs, "trained": trained,
                **({"artifact_id": artifact_id} if artifact_id else {})}

    def _shared(self, key: str, config: TrialConfig, *, data: Data, log: Callable[[str], None],
                callbacks: Sequence[Callback]) -> tuple[str | None, dict[str, torch.Tensor], bool]:
        """The shared base of ``key``: (its artifact id, its weights, whether this call trained it)."""
        stored = self._stored(key)
        cached_id, cached = self._states.get(key, (None, None))
        if cached is not None and (stored is None or stored["artifact_id"] == cached_id):
            return cached_id, cached, False
        if stored is not None:
            try:
                state = self._download(stored["artifact_id"], key)
                log(f"base: reusing the study's base {key} (artifact {stored['artifact_id']}, "
                    f"val {100 * stored['val_accuracy']:.2f}%)")
                self._states[key] = (stored["artifact_id"], state)
                return stored["artifact_id"], state, False
            except ValueError as e:
                log(f"base: {e}: training it again")
        state, record = self._train(config, data=data, log=log, callbacks=callbacks)
        if self.study is None or self.store is None:
            log("base: no artifact store, so this base is kept for this study run in this process only")
            self._states[key] = (None, state)
            return None, state, True
        artifact_id = self._upload(key, state, record, replace=stored, log=log)
        if artifact_id is None:  # another worker stored its base first: that one is the study's
            return self._shared(key, config, data=data, log=log, callbacks=callbacks)
        self._states[key] = (artifact_id, state)
        return artifact_id, state, True

    def _train(self, config: TrialConfig, *, data: Data, log: Callable[[str], None],
               callbacks: Sequence[Callback]) -> tuple[dict[str, torch.Tensor], dict]:
        """Train the base of ``config`` (seeded with ``config.base.seed``, as a trial's first phase would be)."""
        start, seed = time.perf_counter(), config.base.seed or 0
        log(f"base: training {config.model} for {config.train.epochs} epochs (seed {seed}); the study's trials "
            "with the same model, data and train start from it")
        seed_everything(seed)
        model = create_model(config.model, in_shape=data.in_shape, num_classes=data.num_classes,
                             adapt=config.model_adapt, **config.model_kwargs).to(data.device)
        fit, evaluator = resolve_loop(config.train)
        ctx = TrialContext(data=data, train_config=config.train, seed=seed, callbacks=callbacks, log=log, fit=fit,
                           evaluator=evaluator)
        ctx.train(model, phase="base")
        record = {"val_accuracy": ctx.evaluate(model, "val"), "epochs": config.train.epochs,
                  "seconds": round(time.perf_counter() - start, 1)}
        log(f"base: trained in {record['seconds']}s, val {100 * record['val_accuracy']:.2f}%")
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, record

    def _stored(self, key: str) -> dict | None:
        if self.study is None or self.store is None:
            return None
        return stored_bases(self.study).get(key)

    def _download(self, artifact_id: str, key: str) -> dict[str, torch.Tensor]:
        what = f"base {key} (artifact {artifact_id})"
        try:
            with self.store.open_reader(artifact_id) as f:
                return read_weights(io.BytesIO(f.read()), what=what)
        except optuna.artifacts.exceptions.ArtifactNotFound:
            raise ValueError(f"{what} is not in the artifact store") from None

    def _upload(self, key: str, state: dict[str, torch.Tensor], record: dict, *, replace: dict | None,
                log: Callable[[str], None]) -> str | None:
        """Store ``state`` as the study's base of ``key`` unless another worker stored one first (or ``replace``,
        an unreadable one, is still recorded); its artifact id, or None if another worker's was first."""
        if self._stored(key) not in (None, replace):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"base-{key}.pt"
            torch.save(state, path)
            artifact_id = optuna.artifacts.upload_artifact(artifact_store=self.store, file_path=str(path),
                                                           study_or_trial=self.study)
        if self._stored(key) not in (None, replace):  # another worker stored its base meanwhile: first stored wins
            log(f"base: another worker stored base {key} first; this copy (artifact {artifact_id}) is not used")
            return None
        self.study._storage.set_study_system_attr(self.study._study_id, ATTR_PREFIX + key,
                                                  {"artifact_id": artifact_id, **record})
        log(f"base: stored as artifact {artifact_id} for every worker of the study")
        return artifact_id
