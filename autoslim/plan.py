"""autoslim inside your own Optuna objective: sample a compression, run it with your loop, report it.

For a user who already has a study, an objective, a model, a training loop
and a metric::

    def objective(trial):
        plan = autoslim.suggest(trial, methods=["trimming", "l1l2"])
        small = plan.compress(make_model(), fit=fit, evaluate=evaluate, example_inputs=x_val[:256],
                              train={"epochs": 5, "lr": 0.05})
        return autoslim.objectives(trial, small)  # [validation score, parameters]

    study = optuna.create_study(directions=["maximize", "minimize"])

- :func:`suggest` samples the method (Optuna parameter ``method``) and its knobs
  (``<method>.<knob>``), the names a study run by autoslim uses; ``methods``
  may map a method to overrides of its space (a pinned value, or
  ``{"low": .., "high": ..}``, as in a study file).
- :meth:`Plan.compress` checks the model for the method before any training
  (one UsageError line), then runs the method: every training phase calls your
  ``fit`` (:mod:`autoslim.fit`), ``evaluate(model) -> float`` (higher is
  better) scores the validation data after each epoch and at the end (an
  ``evaluate(model, *, split)`` is also asked for ``split="test"``; a one-argument
  one leaves ``test_accuracy`` NaN: score your test set yourself), and
  ``example_inputs`` (a batch of validation inputs, a few hundred) is what the
  surgery traces the model with, trimming measures APoZ on, and the output
  change after a removal is measured on. It returns a
  :class:`~autoslim.trial.TrialResult`: ``.model`` is the smaller network.
- :func:`objectives` stores the result as a study run by autoslim does (user
  attrs, constraints from ``constraints``, artifacts given an
  ``artifact_store``) and returns the objective values; a result that
  removed nothing is pruned unless ``nothing_removed="keep"``.
- :func:`autoslim.search.halving.report_rung` (``autoslim.report_rung``) is the
  multi-objective early stopping: call it from your fit after rung epochs.

>>> import optuna, torch
>>> from autoslim.data import batches, load_data
>>> from autoslim.config import DataConfig
>>> from autoslim.models import create_model
>>> from autoslim.train import evaluate as top1
>>> data = load_data(DataConfig(name="digits", train_subset=300))
>>> def fit(model, *, epochs, hooks, optimizer_factory):
...     opt = optimizer_factory(cls=torch.optim.SGD, lr=0.05, momentum=0.9)
...     for _ in range(epochs):
...         for step, (x, y) in enumerate(batches(data.train, batch_size=64, shuffle=True)):
...             loss = torch.nn.functional.cross_entropy(model(x), y) + hooks.extra_loss(model)
...             opt.zero_grad(); loss.backward(); opt.step(); hooks.on_step_end(model, step)
...         hooks.on_epoch_end(model, {"loss": loss.item()})
>>> def objective(trial):
...     plan = suggest(trial, methods={"trimming": {"rounds": 1, "retrain_epochs": 1, "rule": "fraction"}})
...     model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10)
...     small = plan.compress(model, fit=fit, evaluate=lambda m: top1(m, data.val), example_inputs=data.val.x,
...                           train={"epochs": 1})
...     return objectives(trial, small)
>>> _ = torch.manual_seed(0)  # the initial weights
>>> study = optuna.create_study(directions=["maximize", "minimize"])
>>> study.optimize(objective, n_trials=1)
>>> t = study.trials[0]
>>> t.params["method"], t.values[1] == t.user_attrs["params"] < t.user_attrs["baseline_params"]
('trimming', True)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import optuna
import torch
from torch import nn

from autoslim.config import OBJECTIVES, ConstraintsConfig, DataConfig, PruningConfig, TrainConfig, TrialConfig
from autoslim.data import Data, Split
from autoslim.errors import UsageError
from autoslim.fit import UserEvaluate, UserFit
from autoslim.measure import count_params
from autoslim.methods import METHODS, TrialContext, get_method
from autoslim.schema import build
from autoslim.search.objective import store_result
from autoslim.train import Callback
from autoslim.trial import TrialResult, compress_model


USER_DATA = "user"  # the data name a trial's config records: the user's fit and evaluate bring the data


def suggest(trial: optuna.Trial, *, methods: Sequence[str] | Mapping[str, Mapping[str, Any] | None]) -> "Plan":
    """Sample one of ``methods`` and its knobs in ``trial``; ``methods`` may map a method to overrides of its
    search space (as ``methods.<name>`` of a study file). Unknown names and overrides are one UsageError line."""
    overrides = dict(methods) if isinstance(methods, Mapping) else {m: None for m in methods}
    if not overrides:
        raise UsageError("methods: expected at least one method")
    spaces = {m: METHODS.get(m, field="methods").search_space().narrow(o or {}, where=f"methods.{m}")
              for m, o in overrides.items()}
    method = trial.suggest_categorical("method", list(spaces))
    return Plan(method=method, params=spaces[method].suggest(trial), seed=trial.number)


@dataclass
class Plan:
    """One sampled compression: ``method`` and its complete ``params``."""

    method: str
    params: dict
    seed: int = 0

    def compress(self, model: nn.Module, *, fit: Callable, evaluate: Callable, example_inputs: torch.Tensor,
                 train: TrainConfig | Mapping[str, Any] | None = None,
                 pruning: PruningConfig | Mapping[str, Any] | None = None, callbacks: Sequence[Callback] = (),
                 log: Callable[[str], None] = lambda s: None) -> TrialResult:
        """Compress ``model`` (trained in place by ``fit``; a method that builds its own network, ThriftyNet,
        builds it with the output width of ``model``) and measure the result (see the module doc).

        ``train`` (a :class:`~autoslim.config.TrainConfig` or its keys) sets the epochs of each method phase
        (``epochs``) and the optimizer ``optimizer_factory()`` builds; ``pruning`` (a
        :class:`~autoslim.config.PruningConfig` or its keys ``ignore``, ``round_to``) the rules of a method that
        removes channels, as a study file's ``pruning:`` section; ``callbacks`` see every epoch."""
        start = time.perf_counter()
        config = train if isinstance(train, TrainConfig) else build(TrainConfig, dict(train or {}), "train")
        rules = pruning if isinstance(pruning, PruningConfig) else build(PruningConfig, dict(pruning or {}), "pruning")
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2 or not len(example_inputs):
            raise UsageError(f"example_inputs: expected a batch of inputs (a tensor N x ...), got "
                             f"{type(example_inputs).__name__}")
        data = inputs_only(example_inputs, num_classes=_outputs(model, example_inputs))
        method = get_method(self.method)
        if rules.active and not method.structured:
            raise UsageError(f"pruning: method {self.method!r} does not remove channels, so ignore and round_to do "
                             "not apply to it")
        given = count_params(model)  # what the compression ratio is against, also where the method builds its own
        if method.builds_model:
            model = method.build_model(self.params, in_shape=data.in_shape, num_classes=data.num_classes)
            model = model.to(example_inputs.device)
        ctx = TrialContext(data=data, train_config=config, seed=self.seed, callbacks=callbacks, log=log,
                           fit=UserFit(fit, where="fit"),
                           evaluator=UserEvaluate(evaluate, where="evaluate", need_split=False), pruning=rules)
        trial_config = TrialConfig(method=self.method, params=dict(self.params), model=_name(model), train=config,
                                   seed=self.seed, data=DataConfig(name=USER_DATA), pruning=rules)
        result = compress_model(model, config=trial_config, ctx=ctx, in_shape=data.in_shape, study_params=given)
        result.seconds = time.perf_counter() - start
        return result


def _name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        return int(model(x[:2]).shape[-1])
    finally:
        model.train(was_training)


def inputs_only(x: torch.Tensor, *, num_classes: int) -> Data:
    """In-memory data holding only validation inputs ``x`` (no labels, no training split): what a method needs
    when the user's fit and evaluate bring their own data."""
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    unlabelled = Split(x, torch.full((len(x),), -1, dtype=torch.long, device=x.device))
    return Data(name="example_inputs", train=Split(x[:0], empty), val=unlabelled, test=unlabelled,
                num_classes=num_classes)


def objectives(trial: optuna.Trial, result: TrialResult, *, accuracy: float | None = None,
               objectives: Sequence[str] = ("accuracy", "params"),
               constraints: ConstraintsConfig | Mapping[str, Any] | None = None, artifact_store=None,
               nothing_removed: str = "prune") -> list[float]:
    """Store ``result`` in ``trial`` as a study run by autoslim does and return its objective values.

    ``accuracy`` (default: the result's validation score) replaces the first objective; ``objectives`` are
    among accuracy, params (non-zeros for a sparse result), flops, latency (your study's directions: maximize
    accuracy, minimize the others); ``constraints`` (``max_params``, ``max_flops``, ``min_accuracy``) are set
    with ``trial.set_constraint`` (feasible when <= 0), as a study file's ``constraints`` are; with an Optuna
    ``artifact_store`` the model file, charts and note are uploaded. A result that removed nothing raises
    ``optuna.TrialPruned`` (user attr ``pruned_reason``) unless ``nothing_removed="keep"``.
    """
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise UsageError(f"objectives: unknown objective {unknown[0] if unknown else None!r}; accepted: "
                         f"{', '.join(OBJECTIVES)}")
    if nothing_removed not in ("prune", "keep"):
        raise UsageError(f"nothing_removed: unknown value {nothing_removed!r}; accepted: prune, keep")
    if accuracy is not None:
        value = float(accuracy)
        if not math.isfinite(value):
            raise UsageError(f"accuracy: expected a finite number, got {accuracy!r}")
        result = dataclasses.replace(result, val_accuracy=value)
    budgets = constraints if isinstance(constraints, ConstraintsConfig) else build(
        ConstraintsConfig, dict(constraints or {}), "constraints")
    values = store_result(trial, result, objectives=objectives, constraints=budgets, artifact_store=artifact_store,
                          nothing_removed=nothing_removed)
    if values is None:
        raise optuna.TrialPruned(result.nothing_removed)
    return values
