"""The training loop: one importable function with the hooks compression methods need.

:func:`fit` is autoslim's loop as a fit of the protocol in :mod:`autoslim.fit`
(what every method's phases call; its :class:`Hooks` and :class:`OptimizerFactory`
live here, :func:`run_fit` runs one phase through any fit); :func:`train` runs it
directly. :func:`train` trains a model for a number of epochs on in-memory tensors
(:mod:`autoslim.data`: in memory, or streamed through a ``DataLoader``) with SGD/Adam/AdamW, a cosine, step or constant
learning-rate schedule and weight decay, and calls its :class:`Callback` s
after each optimizer step (masks, projections), for extra loss terms
(regularizers) and at the end of each epoch (statistics, early stopping).

Measured (``benchmarks/bench_train.py``, LeNet-5 on 20k MNIST images, 2 epochs,
2 idle CPU cores, median of 3): 16.0 s against 15.6 s for a minimal hand-written
PyTorch loop doing the same work (ratio 1.03), the same test accuracy (98.45%),
and its in-memory batches are 1.57x faster per epoch than torchvision's
``DataLoader`` with ``ToTensor``/``Normalize``.

>>> import torch
>>> from autoslim.config import DataConfig, TrainConfig
>>> from autoslim.data import load_data
>>> from autoslim.models import create_model
>>> data = load_data(DataConfig(name="digits"))
>>> _ = torch.manual_seed(0)  # the initial weights: the example must not depend on what ran before it
>>> model = create_model("lenet300_100", in_shape=data.in_shape, num_classes=10)
>>> history = train(model, data, config=TrainConfig(epochs=3, lr=0.05), seed=0)
>>> history[-1]["val_accuracy"] > 0.8
True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoslim.config import TrainConfig
from autoslim.data import Data, Split
from autoslim.errors import UsageError


class Callback:
    """Hooks into :func:`train`. Override what you need; every hook is optional."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every step (a regularizer)."""
        return None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (re-apply a mask, project parameters)."""

    def on_epoch_end(self, model: nn.Module, record: dict) -> None:
        """Called after every epoch with its record (loss, accuracies, lr, time).

        May raise (``optuna.TrialPruned`` from an early-stopping rung, for example)."""

    def on_batch(self, model: nn.Module, *, epochs_done: int, batch: int, batches: int,
                 evaluate: Callable[[nn.Module], float]) -> None:
        """Called after every optimizer step, after :meth:`on_step_end`: ``batch`` steps of ``batches`` (the
        steps an epoch takes) done in the epoch after ``epochs_done`` (counted across phases); ``evaluate(model)``
        scores the validation split as the epoch records do (a rung inside an epoch)."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a trial is reproducible on one machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool = True) -> Iterator[None]:
    """While inside, CUDA uses deterministic kernels (``train.deterministic``); the previous settings come back after.

    With the same seed, a rerun on the same GPU model and software then gives
    the same weights (by default cuDNN's backward convolutions add in an
    arbitrary order, so two runs drift apart). cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG``: it is set here when unset, which takes effect
    if this process has not used cuBLAS yet; export it to be sure. An operation
    with no deterministic CUDA kernel warns rather than fails. CPU training is
    deterministic without this.

    >>> with deterministic_kernels():
    ...     torch.are_deterministic_algorithms_enabled()
    True
    >>> torch.are_deterministic_algorithms_enabled()
    False
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(params, config: TrainConfig, *, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over ``params`` (tensors or param-group dicts)."""
    lr = config.lr * lr_scale
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, epochs: int):
    """The schedule as a function of the epoch: cosine to zero, steps at milestone fractions, or constant."""
    if config.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / max(1, epochs)))
    if config.schedule == "step":
        marks = [m * epochs for m in config.milestones]
        return lambda e: config.gamma ** sum(e >= m for m in marks)
    return lambda e: 1.0


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``split`` (in memory or streamed) in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=split.device)
    for x, y in split.batches(batch_size=batch_size):
        correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return correct.item() / max(1, len(split))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, refused in one line (UsageError) unless it is one tensor: a model that returns several
    outputs in training mode (torchvision's GoogLeNet and Inception3 with their auxiliary classifiers, whose
    layers the channel analysis, run in eval mode, does not see) cannot be trained on its logits alone."""
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"model: {type(model).__name__} returns {type(out).__name__}, not one tensor of logits, "
                         f"in training mode; build it without auxiliary outputs (torchvision's GoogLeNet and "
                         f"Inception3: model_kwargs aux_logits: false)")
    return out


class OptimizerFactory:
    """``optimizer_factory(params=None, *, cls=None, **options)``: the optimizer of one phase (see the module doc).

    >>> factory = OptimizerFactory([nn.Parameter(torch.ones(2))], config=TrainConfig(lr=0.1), lr_scale=0.5)
    >>> type(factory()).__name__, factory().param_groups[0]["lr"]
    ('SGD', 0.05)
    >>> factory(cls=torch.optim.Adam, lr=1e-3).param_groups[0]["lr"]
    0.0005
    """

    def __init__(self, params: Sequence, *, config: TrainConfig, lr_scale: float = 1.0) -> None:
        self.params, self.config, self.lr_scale = list(params), config, lr_scale
        self.built: torch.optim.Optimizer | None = None  # the last optimizer built: the phase's learning rate
        self.base_lr = 0.0

    def __call__(self, params=None, *, cls: type | None = None, **options) -> torch.optim.Optimizer:
        params = self.params if params is None else params
        if cls is None:
            if options:
                raise TypeError(f"optimizer_factory: options {sorted(options)} need cls (the study's train "
                                f"section sets {self.config.optimizer}'s)")
            optimizer = build_optimizer(params, self.config, lr_scale=self.lr_scale)
        else:
            optimizer = cls(params, **{**options, "lr": options.get("lr", self.config.lr) * self.lr_scale})
        self.built, self.base_lr = optimizer, optimizer.param_groups[0]["lr"]
        return optimizer

    def lr_ratio(self) -> float | None:
        """The built optimizer's learning rate now over its initial one (the user's schedule); None if none."""
        if self.built is None:
            return None
        return self.built.param_groups[0]["lr"] / self.base_lr if self.base_lr else 1.0


class ExtraSteps(Callback):
    """Steps a method's own optimizers (SSS's APG on its scaling factors) after each step of a user fit, at their
    learning rate times the ratio the fit's optimizer is at now (so they follow the user's schedule)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], factory: OptimizerFactory, where: str) -> None:
        self.optimizers, self.factory, self.where = list(optimizers), factory, where
        self.base = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def on_step_end(self, model: nn.Module, step: int) -> None:
        ratio = self.factory.lr_ratio()
        if ratio is None:
            raise UsageError(f"{self.where}: this phase trains extra tensors ({type(self.optimizers[0]).__name__}) "
                             "at the learning rate of the optimizer built by optimizer_factory; the fit built none")
        for optimizer, base in zip(self.optimizers, self.base):
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * ratio
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Callback, name)


class Hooks:
    """What a fit calls (the protocol of :mod:`autoslim.fit`); built by :func:`run_fit` for each phase.

    ``evaluate(model) -> float`` scores the validation split after each epoch. ``on_state(records, state)``,
    given, receives the loop state a resumable fit passes to :meth:`on_epoch_end` (a checkpoint), before the
    callbacks run; ``resumable`` (the fit takes ``resume``) makes that state required. ``epoch_offset`` counts the
    epochs trained before this call (earlier phases, and the ``resumed`` epochs of this phase a resumed fit skips).
    """

    def __init__(self, callbacks: Sequence[Callback], *, phase: str | None, epoch_offset: int,
                 evaluate: Callable[[nn.Module], float], factory: OptimizerFactory | None = None,
                 on_state: Callable[[list[dict], Any], None] | None = None, resumable: bool = False,
                 resumed: int = 0, where: str = "fit") -> None:
        self.where = where
        self.callbacks, self.phase, self.epoch_offset, self.resumed = list(callbacks), phase, epoch_offset, resumed
        self.evaluate, self.factory, self.on_state, self.resumable = evaluate, factory, on_state, resumable
        self._loss = [c for c in self.callbacks if _overrides(type(c), "extra_loss")]
        self._step = [c for c in self.callbacks if _overrides(type(c), "on_step_end")]
        self._batch = [c for c in self.callbacks if _overrides(type(c), "on_batch")]
        self.records: list[dict] = []
        self.steps = self.loss_calls = self.batch = 0
        #: The steps an epoch takes: set by :func:`run_fit` from the study's data and ``train.batch_size``; a fit
        #: that takes another number of steps per epoch sets it (``hooks.batches_per_epoch = len(loader)``).
        self.batches_per_epoch: int | None = None
        self._start = time.perf_counter()

    @property
    def needs_loss(self) -> bool:
        return bool(self._loss)

    @property
    def needs_steps(self) -> bool:
        return bool(self._step or self._batch)

    @property
    def epochs_done(self) -> int:
        """Epochs trained so far across the trial's phases."""
        return self.epoch_offset + len(self.records)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | float:
        """The methods' loss terms (a tensor), or ``0.0`` when none adds one: add it to your loss before backward."""
        self.loss_calls += 1
        total = None
        for c in self._loss:
            extra = c.extra_loss(model)
            if extra is not None:
                total = extra if total is None else total + extra
        return 0.0 if total is None else total

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Call after every optimizer step."""
        self.steps += 1
        self.batch += 1
        for c in self._step:
            c.on_step_end(model, step)
        for c in self._batch:
            c.on_batch(model, epochs_done=self.epochs_done, batch=self.batch, batches=self.batches_per_epoch or 0,
                       evaluate=self.evaluate)

    def on_epoch_end(self, model: nn.Module, record: Mapping[str, Any] | None = None, *, state: Any = None) -> None:
        """Call after every epoch with what you measured (``loss``: mean training loss; ``lr``: the learning rate
        the epoch trained at, else the built optimizer's now) and, from a resumable fit, its loop ``state``."""
        own = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in (record or {}).items()}
        loss = float(own.get("loss", math.nan))
        epoch = self.epochs_done + 1
        lr = own.get("lr", self.factory.built.param_groups[0]["lr"] if self.factory and self.factory.built else None)
        if "loss" in own and not math.isfinite(loss):
            raise Diverged(f"training loss is {loss} at epoch {epoch}" + (f" (lr {lr:g})" if lr is not None else ""))
        if self.resumable and state is None:
            raise UsageError(f"{self.where}: a fit that takes resume must pass its loop state after every epoch: "
                             f"hooks.on_epoch_end(model, record, state=...) (epoch {epoch} passed none)")
        seconds = time.perf_counter() - self._start
        full = {**own, **({"lr": lr} if lr is not None else {}), "epoch": epoch, "loss": loss,
                "val_accuracy": self.evaluate(model), "seconds": seconds,
                **({"phase": self.phase} if self.phase is not None else {})}
        self.records.append(full)
        if state is not None and self.on_state is not None:
            self.on_state(self.records, state)
        self.batch = 0
        for c in self.callbacks:
            c.on_epoch_end(model, full)
        self._start = time.perf_counter()


def fit(model: nn.Module, *, epochs: int, hooks: Hooks, optimizer_factory: OptimizerFactory, data: Data,
        config: TrainConfig, seed: int = 0, resume: Mapping[str, Any] | None = None) -> None:
    """autoslim's own loop, as a fit of the protocol in :mod:`autoslim.fit` (with its ``resume`` extension).

    Trains ``model`` in place for ``epochs`` on ``data.train`` (shuffled by a generator seeded with ``seed``;
    ``data``'s crop and flip) with the optimizer of ``optimizer_factory`` under ``config``'s schedule and label
    smoothing. After every epoch it passes its state (``epoch`` done, ``step``, optimizer and schedule states,
    the shuffling generator) to ``hooks.on_epoch_end``; ``resume=state`` continues after that epoch as if never
    interrupted.
    """
    device = data.device
    model.to(device).train()
    optimizer = optimizer_factory()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, epochs))
    generator = data.train.generator(seed)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
    step = 0 if resume is None else resume["step"]
    with deterministic_kernels(config.deterministic and device.type == "cuda"):
        for epoch in range(0 if resume is None else resume["epoch"], epochs):
            total = torch.zeros((), device=device)
            for x, y in data.train.batches(batch_size=config.batch_size, shuffle=True, generator=generator,
                                           crop_padding=data.crop_padding, flip=data.flip):
                loss = F.cross_entropy(logits(model, x), y, label_smoothing=config.label_smoothing)
                if hooks.needs_loss:  # no tensor op per step where no method adds a term
                    loss = loss + hooks.extra_loss(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                hooks.on_step_end(model, step)
                total += loss.detach() * len(y)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            hooks.on_epoch_end(model, {"loss": total.item() / len(data.train), "lr": lr}, state={
                "epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state()})


def run_fit(fn: Callable[..., Any], model: nn.Module, *, data: Data, config: TrainConfig, epochs: int,
            keywords: Collection[str], callbacks: Sequence[Callback] = (),
            score: Callable[[nn.Module], float] | None = None, phase: str | None = None, epoch_offset: int = 0,
            seed: int = 0, lr_scale: float = 1.0, param_groups: Iterable | None = None,
            extra_optimizers: Sequence[torch.optim.Optimizer] = (), resume: Mapping[str, Any] | None = None,
            on_state: Callable[[list[dict], dict], None] | None = None, where: str = "fit") -> tuple[Hooks, Any]:
    """Run one phase through the fit ``fn``: build its optimizer factory and hooks, call
    ``fn(model, epochs=, hooks=, optimizer_factory=, **optional)`` with the optional keywords named in
    ``keywords`` (``phase``, ``seed``, ``lr_scale``, ``data``, ``config``, ``resume``); return the hooks (their
    ``records``, counts of hook calls) and what ``fn`` returned. ``score(model)`` (default: top-1 accuracy on
    ``data.val``) is each epoch record's ``val_accuracy``.

    Extra optimizers (tensors outside the model, SSS's scaling factors) step after every step of the fit at
    their learning rate times the ratio the fit's optimizer is at (:class:`ExtraSteps`). A fit that takes
    ``resume`` is checkpointed after every epoch: ``on_state(records, state)`` gets ``state`` =
    ``{"epoch": epochs of this phase done, "fit": the fit's own state, "extra": the extra optimizers' states}``,
    and ``resume=state`` resumes the phase after that epoch.
    """
    params = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    factory = OptimizerFactory(params, config=config, lr_scale=lr_scale)
    extra = [ExtraSteps(extra_optimizers, factory, where)] if extra_optimizers else []
    done = 0 if resume is None else resume["epoch"]
    if resume is not None:
        for o, state in zip(extra_optimizers, resume["extra"], strict=True):
            o.load_state_dict(state)
    save = None if on_state is None else lambda records, state: on_state(records, {
        "epoch": done + len(records), "fit": state, "extra": [o.state_dict() for o in extra_optimizers]})
    hooks = Hooks([*extra, *callbacks], phase=phase, epoch_offset=epoch_offset + done,
                  evaluate=score or functools.partial(evaluate, split=data.val), factory=factory,
                  on_state=save, resumable="resume" in keywords, resumed=done, where=where)
    hooks.batches_per_epoch = math.ceil(len(data.train) / config.batch_size) if data is not None and len(
        data.train) else None
    optional = {"phase": phase, "seed": seed, "lr_scale": lr_scale, "data": data, "config": config,
                "resume": None if resume is None else resume["fit"]}
    model.train()
    returned = fn(model, epochs=epochs, hooks=hooks, optimizer_factory=factory, **{k: optional[k] for k in keywords})
    return hooks, returned


def train(model: nn.Module, data: Data, *, config: TrainConfig, epochs: int | None = None, seed: int = 0,
          lr_scale: float = 1.0, callbacks: Sequence[Callback] = (), param_groups: Iterable | None = None,
          extra_optimizers: Sequence[torch.optim.Optimizer] = (), epoch_offset: int = 0, phase: str | None = None,
          resume: Mapping[str, Any] | None = None, on_state: Callable[[list[dict], dict], None] | None = None,
          score: Callable[[nn.Module], float] | None = None) -> list[dict]:
    """Train ``model`` in place for ``epochs`` (default ``config.epochs``) with autoslim's loop (:func:`fit`);
    return one record per epoch.

    ``param_groups`` replaces the model's parameters in the main optimizer
    (a method that trains some tensors with its own optimizer passes those in
    ``extra_optimizers``; they follow the main optimizer's schedule).
    ``epoch_offset`` numbers the records when a method trains in phases.
    Each record holds ``epoch``, ``loss`` (mean training loss), ``val_accuracy``,
    ``lr``, ``seconds`` and, given one, the ``phase`` name. A NaN or infinite
    loss raises :class:`Diverged`. ``score(model)`` replaces top-1 accuracy on
    ``data.val`` as ``val_accuracy`` (a user's metric, :mod:`autoslim.fit`).

    ``on_state(records, state)`` is called after every epoch with this call's
    records so far and the loop state (:func:`run_fit`); ``resume=state``
    continues from that epoch as if never interrupted (:mod:`autoslim.checkpoint`
    saves and restores the rest of a trial). It is called before the callbacks' ``on_epoch_end``,
    so an epoch whose progress line was printed, or whose early-stopping rung was
    recorded, is already checkpointed: a worker killed right after it loses nothing.
    """
    epochs = config.epochs if epochs is None else epochs
    return run_fit(fit, model, data=data, config=config, epochs=epochs, keywords=FIT_OPTIONAL, callbacks=callbacks,
                   score=score, phase=phase, epoch_offset=epoch_offset, seed=seed, lr_scale=lr_scale,
                   param_groups=param_groups, extra_optimizers=extra_optimizers, resume=resume,
                   on_state=on_state)[0].records


FIT_OPTIONAL = ("seed", "data", "config", "resume")  # the optional keywords autoslim's own fit takes
