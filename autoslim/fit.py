"""Your training loop: the ``fit`` protocol that every method's training phases call, and a user ``evaluate``.

A method trains in phases (train, prune, retrain, ...). Each phase calls one
fit of this protocol: autoslim's loop (:func:`autoslim.train.fit`, wrapped as
:data:`BUILTIN_FIT`) by default, or yours. With a user ``fit``
(study file ``train: {fit: mypkg.train:fit}``, or ``plan.compress(model,
fit=...)`` in your own Optuna objective) each phase calls::

    fit(model, *, epochs, hooks, optimizer_factory, **optional) -> None

- ``model``: train it in place, for ``epochs`` epochs (a phase's count; may be 0 for no phase).
- ``hooks`` (:class:`Hooks`): add ``hooks.extra_loss(model)`` to your loss
  (l1/l2's regularizer; ``0.0`` when no method adds one), call
  ``hooks.on_step_end(model, step)`` after every optimizer step (IHT's masks,
  SSS's proximal step on its scaling factors, the early-stopping check) and
  ``hooks.on_epoch_end(model, record)`` after every epoch, ``record`` a dict
  of what you measured (``loss``: the mean training loss, for the progress
  line, the charts and divergence detection). autoslim adds ``epoch``
  (counted across phases), ``phase``, ``val_accuracy`` (your ``evaluate`` on the
  validation split, else top-1 accuracy), ``lr`` and ``seconds``, then runs
  the rung check, the progress line and the heartbeat. ``hooks.epochs_done``
  is the count of epochs trained across phases so far. Early-stopping rungs
  inside an epoch (``early_stopping.rungs: [0.25, ...]``) count your
  ``on_step_end`` calls against ``hooks.batches_per_epoch`` (by default the
  training split's size over ``train.batch_size``, rounded up): if your epochs
  take another number of steps, set it before the first step; an epoch that
  ends before its rung is refused in one line.
- ``optimizer_factory(params=None, *, cls=None, **options)``
  (:class:`OptimizerFactory`): the phase's optimizer over ``params`` (default:
  the model's trainable parameters): the study's ``train`` optimizer, or
  ``cls(params, **options)``; the learning rate (``options["lr"]``, default
  ``train.lr``) is multiplied by the phase's scale (IHT's sparse phases,
  fine-tunes at a tenth). Build the optimizer with it: SSS's scaling factors
  follow its learning rate (your schedule included), and a phase that needs
  them refuses a fit that built none.
- ``optional``: keywords passed only if your ``fit`` names them (or takes
  ``**kwargs``): ``phase`` (the phase name), ``seed`` (autoslim's loop seeds
  its shuffling with it), ``lr_scale``, ``data`` (the study's
  :class:`~autoslim.data.Data`) and ``config`` (the phase's
  :class:`~autoslim.config.TrainConfig`: batch size, schedule...).
- ``resume`` (an extension; passed only if your ``fit`` names it, not through
  ``**kwargs``): ``None`` for a fresh phase, else the ``state`` your fit last
  passed to ``hooks.on_epoch_end(model, record, state=state)``; continue after
  that epoch (report only the remaining epochs). A fit that names ``resume``
  must pass its ``state`` after every epoch: anything ``torch.save`` stores and
  ``torch.load(weights_only=True)`` reads back (tensors, numbers, strings,
  lists, dicts: ``optimizer.state_dict()``, a generator's ``get_state()``).
  autoslim's own loop is such a fit.

Refusals, each one line naming the field: a fit that is not callable or lacks
these keywords, that returns anything but ``None``, that reported fewer or
more epochs than asked through ``hooks.on_epoch_end``, or that never called
``hooks.on_step_end`` (or ``hooks.extra_loss``) where a method needs it.

**Checkpoints.** A retried trial replays the finished phases without training
(weights, RNG states, records). A fit that takes ``resume`` (autoslim's loop
included) is checkpointed after every epoch and the retry resumes the phase in
progress after its last finished epoch; any other fit is checkpointed at phase
ends only and the phase in progress is redone from its start.

**evaluate.** ``evaluate(model, *, split) -> float`` (``train: {evaluate:
mypkg.train:evaluate}``), higher is better, replaces top-1 accuracy as the
first objective, in epoch records and at the rungs: ``split`` is ``"val"``
(records, rungs, the objective) or ``"test"`` (the trial's
``test_accuracy``, never seen by the search). The model is in eval mode;
its training flag is restored after.

>>> import torch, torch.nn.functional as F
>>> from autoslim.config import DataConfig, TrainConfig
>>> from autoslim.data import batches, load_data
>>> from autoslim.methods import TrialContext
>>> from autoslim.models import create_model
>>> data = load_data(DataConfig(name="digits", train_subset=300))
>>> def fit(model, *, epochs, hooks, optimizer_factory):
...     opt = optimizer_factory()
...     for epoch in range(epochs):
...         for step, (x, y) in enumerate(batches(data.train, batch_size=64, shuffle=True)):
...             loss = F.cross_entropy(model(x), y) + hooks.extra_loss(model)
...             opt.zero_grad(); loss.backward(); opt.step()
...             hooks.on_step_end(model, step)
...         hooks.on_epoch_end(model, {"loss": loss.item()})
>>> ctx = TrialContext(data=data, train_config=TrainConfig(epochs=2), fit=UserFit(fit))
>>> [(r["epoch"], r["phase"]) for r in ctx.train(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10))]
[(1, 'train'), (2, 'train')]
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from autoslim.config import TrainConfig
from autoslim.errors import UsageError
from autoslim.registry import import_object
from autoslim.train import Callback, ExtraSteps, Hooks, OptimizerFactory, fit as builtin_loop, run_fit

__all__ = ["BUILTIN_FIT", "ExtraSteps", "Hooks", "OptimizerFactory", "UserEvaluate", "UserFit", "resolve_loop"]

FIT_KEYWORDS = ("epochs", "hooks", "optimizer_factory")
OPTIONAL_KEYWORDS = ("phase", "seed", "lr_scale", "data", "config", "resume")


def _describe(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)


def _keywords(fn: Callable, where: str) -> tuple[set[str], bool]:
    """The keyword names ``fn`` accepts, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {_describe(fn)} has no inspectable signature") from None
    params = sig.parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _takes_positional(fn: Callable) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def number(value: Any, where: str) -> float:
    """``value`` (a Python/NumPy number or a one-element tensor) as a finite float; else a UsageError line."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        ok = not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"{where} returned {value!r}; expected a finite number (higher is better)")
    return float(value)


class UserEvaluate:
    """A user's ``evaluate(model, *, split) -> float`` (or ``evaluate(model)`` where ``need_split`` is False: the
    validation score only), checked once; called in eval mode.

    >>> UserEvaluate(lambda model, *, split: 0.5, where="train.evaluate")(nn.Linear(2, 2), "test")
    0.5
    >>> UserEvaluate(lambda model: 0.5, where="train.evaluate")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: train.evaluate: <lambda> must be evaluate(model, *, split) with split 'val' or 'test' (validation and test stay distinct); it takes no keyword 'split'
    """

    def __init__(self, fn: Callable, *, where: str = "evaluate", need_split: bool = True) -> None:
        if not callable(fn):
            raise UsageError(f"{where}: expected a callable evaluate(model, *, split) -> float, got {fn!r}")
        names, var = _keywords(fn, where)
        self.splits = "split" in names or var
        if need_split and not self.splits:
            raise UsageError(f"{where}: {_describe(fn)} must be evaluate(model, *, split) with split 'val' or "
                             "'test' (validation and test stay distinct); it takes no keyword 'split'")
        if not _takes_positional(fn):
            raise UsageError(f"{where}: {_describe(fn)} must take the model as its first argument")
        self.fn, self.where = fn, where

    def __call__(self, model: nn.Module, split: str = "val") -> float:
        """The score of ``model`` on ``split``; NaN for ``"test"`` from an ``evaluate(model)`` (validation only)."""
        if not self.splits and split != "val":
            return math.nan
        was_training = model.training
        model.eval()
        try:
            value = self.fn(model, split=split) if self.splits else self.fn(model)
        finally:
            model.train(was_training)
        return number(value, f"{self.where}: {_describe(self.fn)}(split={split!r})")


class UserFit:
    """A user's ``fit`` (the protocol of this module), checked once, run for each phase of a trial.

    >>> UserFit(lambda model, *, epochs: None, where="train.fit")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: train.fit: <lambda> must be fit(model, *, epochs, hooks, optimizer_factory, ...); it takes no keyword 'hooks'
    """

    def __init__(self, fn: Callable, *, where: str = "fit") -> None:
        if not callable(fn):
            raise UsageError(f"{where}: expected a callable fit(model, *, epochs, hooks, optimizer_factory), "
                             f"got {fn!r}")
        names, var = _keywords(fn, where)
        missing = [k for k in FIT_KEYWORDS if k not in names and not var]
        if missing or not _takes_positional(fn):
            lacks = f"it takes no keyword {missing[0]!r}" if missing else "it takes no positional model"
            raise UsageError(f"{where}: {_describe(fn)} must be fit(model, *, epochs, hooks, optimizer_factory, "
                             f"...); {lacks}")
        self.fn, self.where = fn, where
        # resume only where named: a fit taking **kwargs does not promise to pass its state
        self.optional = [k for k in OPTIONAL_KEYWORDS if k in names or (var and k != "resume")]

    @property
    def resumable(self) -> bool:
        """Whether the fit takes ``resume`` (the protocol's extension): checkpointed after every epoch."""
        return "resume" in self.optional

    def __call__(self, model: nn.Module, *, epochs: int, callbacks: Sequence[Callback], config: TrainConfig,
                 evaluate: Callable[[nn.Module], float], phase: str, epoch_offset: int, seed: int,
                 lr_scale: float = 1.0, param_groups=None, extra_optimizers: Sequence[torch.optim.Optimizer] = (),
                 data: Any = None, resume: Mapping[str, Any] | None = None,
                 on_state: Callable[[list[dict], dict], None] | None = None) -> list[dict]:
        """Run one phase through the fit (:func:`autoslim.train.run_fit`); return its epoch records.
        ``resume``/``on_state``: a resumable fit's checkpoint, as in :func:`autoslim.train.train`."""
        hooks, returned = run_fit(self.fn, model, data=data, config=config, epochs=epochs, keywords=self.optional,
                                  callbacks=callbacks, score=evaluate, phase=phase, epoch_offset=epoch_offset,
                                  seed=seed, lr_scale=lr_scale, param_groups=param_groups,
                                  extra_optimizers=extra_optimizers, resume=resume, on_state=on_state,
                                  where=self.where)
        self._check(returned, hooks, epochs=epochs - hooks.resumed, phase=phase)
        return hooks.records

    def _check(self, returned: Any, hooks: Hooks, *, epochs: int, phase: str) -> None:
        where = f"{self.where}: {_describe(self.fn)}"
        if returned is not None:
            raise UsageError(f"{where} returned a {type(returned).__name__}; expected None "
                             "(report each epoch through hooks.on_epoch_end(model, record))")
        if len(hooks.records) != epochs:
            raise UsageError(f"{where} reported {len(hooks.records)} epochs of phase {phase!r} through "
                             f"hooks.on_epoch_end, asked for {epochs}; call it once after every epoch"
                             + (f" (after the {hooks.resumed} it resumed after)" if hooks.resumed else ""))
        if epochs and hooks.needs_steps and not hooks.steps:
            raise UsageError(f"{where} never called hooks.on_step_end(model, step) in phase {phase!r}, where a "
                             "method acts after every optimizer step; call it after each one")
        if epochs and hooks.needs_loss and not hooks.loss_calls:
            raise UsageError(f"{where} never called hooks.extra_loss(model) in phase {phase!r}, where a method "
                             "adds a loss term; add it to your loss before backward")


def resolve_loop(config: TrainConfig, *, where: str = "train") -> tuple[UserFit | None, UserEvaluate | None]:
    """The user ``fit`` and ``evaluate`` a study's ``train`` section names by import string (None where unset),
    checked; a UsageError line naming ``train.fit``/``train.evaluate`` if one cannot be had or used.

    >>> resolve_loop(TrainConfig(fit="os.path:join"))
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: train.fit: join must be fit(model, *, epochs, hooks, optimizer_factory, ...); it takes no keyword 'epochs'
    """
    fit = evaluate = None
    if config.fit is not None:
        fit = UserFit(import_object(config.fit, field=f"{where}.fit"), where=f"{where}.fit")
    if config.evaluate is not None:
        evaluate = UserEvaluate(import_object(config.evaluate, field=f"{where}.evaluate"),
                                where=f"{where}.evaluate")
    return fit, evaluate


#: autoslim's own loop (:func:`autoslim.train.fit`) as a fit of this protocol, resumable mid-phase; what a
#: trial's phases run when the study names no ``train.fit``.
BUILTIN_FIT = UserFit(builtin_loop, where="autoslim's loop")
