"""Every torchvision classification model x every compression method's removal step: compressed, or refused.

For each model of ``torchvision.models.list_models(module=torchvision.models)``
(``weights=None``, 1000 classes, eval mode, random BatchNorm statistics, every
constant-initialised parameter made random: zero biases, ViT's class token and
head, ConvNeXt's layer scale) and each method, one *cell* runs the method's
own ``compress`` on the untrained model with training replaced by a forced
removal decision of about ``RATIO`` (30%) of every structure, so that what is
timed is the method's analysis, decision and surgery:

- ``trimming``: 30% of the channels of every channel group
  (:func:`autoslim.surgery.channel_groups`) are made dead (their producers'
  rows and biases and their BatchNorm's weight and bias zeroed, so they are 0
  through the activation: APoZ 1); the method runs with ``rule: fraction,
  fraction: 0.3, layers: all``, one round, and removes them by its own APoZ rule;
  a BatchNorm entry whose input is then exactly 0 is zeroed too
  (:func:`silence_zero_inputs`), so that DenseNet's concatenated dead channels
  are 0 after every later layer's own BatchNorm and ReLU.
- ``l1l2``: 30% of the filters (weight rows only, as its regularizer leaves them)
  of every group's producers are zeroed; the method removes the filters under
  its ``threshold`` and folds the constants they still output.
- ``sss``: at the method's training phase, 30% of its scaling factors (every
  channel factor tensor, and every third block factor) are set to zero;
  ``level: both`` (the search space's default) where the model has channels
  and residual branches to scale, else the level that finds structures in it
  (what :func:`autoslim.study.check_methods` asks a study to narrow ``level``
  to), ``threshold: 0``.
- ``iht``: one hard-thresholding cycle at ``keep_ratio`` 0.7; the "removal" is
  the masking itself: params after = non-zeros, no error to measure.
- ``heads`` (surgery only, no method uses it yet): 30% of the attention heads of
  every layer of :func:`autoslim.surgery.heads.head_groups` (MLP hidden widths are
  channel groups, in the methods' cells); "n/a" for a model without any.

The reference is the *masked* model (the model after the zeroing above, with
the factors' hooks for sss); a cell's error is ``max|reduced - masked| /
max|masked|`` over 4 random images, both run in float64, its time the wall time of the method's
``compress`` (the capture of the reference excluded). A method's ``check``
(if it has one) runs first, as a trial would. Outcomes: ``compressed`` (fewer
parameters, error < 1e-5), ``inexact`` (fewer parameters, larger error),
``nothing removed``, ``refused up front`` (a one-line UsageError before the
method's first training phase), ``refused late`` (after it: in a real trial the
training budget is spent), ``crashed`` (any other exception), ``timeout``,
``skipped`` (more parameters than ``--max-params``, or the model does not run at
its input size).

Inputs: ``--input-size`` (default 64) for all but inception_v3 (75, its
minimum) and maxvit_t (224: its partitions need 224 / 32 = 7); ViTs are built
with ``image_size`` = the input size (rounded down to a multiple of their patch).

``--trial`` adds, for a representative subset (``--trial-models``), one short
real trial per method through :func:`autoslim.run_trial` on synthetic data (one
epoch of 64 images at 32x32, or the model's minimum) with knobs that remove
something in a short run; its outcome is what the trial reports.

    python benchmarks/bench_zoo.py                               # the whole zoo, every method
    python benchmarks/bench_zoo.py --models resnet18 vit --methods trimming heads
    python benchmarks/bench_zoo.py --trial --markdown docs/zoo.md --json zoo.json
    python benchmarks/bench_zoo.py --report-from zoo.json          # the report again, nothing run

Every knob is set inside its search-space range (a method that checks its
knobs accepts them). A compressed cell that removes under 1% of the parameters
(a forced 30% decision that reached only a stem group) is marked ``(<1%)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import inspect
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import Data, Split, load_data
from autoslim.errors import UsageError
from autoslim.surgery.heads import head_groups, mask_heads, remove_heads
from autoslim.measure import count_nonzeros, count_params
from autoslim.methods import Method, TrialContext, get_method
from autoslim.methods.sss import structures
from autoslim.models import list_models, register_model
from autoslim.trial import run_trial
from autoslim.surgery import channel_groups
from autoslim.train import Callback

RATIO = 0.3
ERROR_LIMIT = 1e-5
MARGINAL = 0.01  # a compressed cell that removes less than this share of the parameters is flagged "(<1%)"
N_IMAGES = 4
FAMILIES = {  # family: pattern of torchvision's names (the 18 families)
    "resnet": r"resnet\d+$", "resnext": r"resnext", "wide_resnet": r"wide_resnet", "densenet": r"densenet",
    "mobilenet": r"mobilenet_v[23]", "efficientnet": r"efficientnet", "regnet": r"regnet", "mnasnet": r"mnasnet",
    "googlenet": r"googlenet", "inception": r"inception", "squeezenet": r"squeezenet", "shufflenet": r"shufflenet",
    "vgg": r"vgg", "alexnet": r"alexnet", "convnext": r"convnext", "vit": r"vit_", "swin": r"swin",
    "maxvit": r"maxvit",
}
MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}
METHODS = ("trimming", "l1l2", "sss", "iht", "heads")
TRIAL_MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "vgg11_bn", "regnet_x_400mf",
                "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_32", "swin_t")


# --- models --------------------------------------------------------------------------------------------------------
def family_of(name: str) -> str:
    return next((f for f, pattern in FAMILIES.items() if re.match(pattern, name)), "other")


def select_models(wanted: Sequence[str] | None) -> list[str]:
    """torchvision's classification models named in ``wanted`` (names or families); all of them by default."""
    zoo = torchvision.models.list_models(module=torchvision.models)
    if not wanted:
        return zoo
    unknown = [w for w in wanted if w not in zoo and w not in FAMILIES]
    if unknown:
        raise UsageError(f"--models: unknown value {unknown[0]!r}; accepted: model names or families "
                         f"({', '.join(FAMILIES)})")
    return [m for m in zoo if m in wanted or family_of(m) in wanted]


def input_size(name: str, size: int) -> int:
    size = max(size, MIN_SIZE.get(name, 0))
    if name.startswith("vit_"):
        patch = int(re.search(r"(\d+)$", name).group(1))
        size = max(patch, size // patch * patch)
    return size


def build(name: str, size: int, *, num_classes: int = 1000) -> nn.Module:
    """torchvision's ``name`` without weights; ViTs for ``size`` inputs, GoogLeNet and Inception without
    their auxiliary classifiers (used in training only) and with PyTorch's default initialisation."""
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": False}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def n_params(name: str, size: int) -> int:
    """The parameter count, without allocating the weights where the builder allows (RegNet's does not)."""
    try:
        with torch.device("meta"):
            return count_params(build(name, size))
    except NotImplementedError:  # the builder computes widths with tensors, which cannot be read on "meta"
        return count_params(build(name, size))


@torch.no_grad()
def randomize(model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> nn.Module:
    """Every constant parameter (zero biases, norms' affine parameters, class tokens, zero-initialised heads,
    layer scales) made random, then BatchNorm statistics measured on ``x``; returns ``model`` in eval mode."""
    for p in model.parameters():
        v = p.flatten()[0].item() if p.numel() else 0.0
        if p.numel() and bool((p == v).all()):
            noise = torch.rand(p.shape, generator=gen)
            p.copy_(noise * 0.4 - 0.2 if abs(v) < 1e-3 else v * (noise + 0.5))
    return calibrate(model, x)


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of one training-mode forward of ``x``, so that signals keep their scale through
    the depth (with stale random statistics they fade, and whole channels read 0); returns it in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, its statistics
    model.train()(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


# --- forcing a method's decision -----------------------------------------------------------------------------------
class ForcingContext(TrialContext):
    """A TrialContext that never trains: at each training phase it calls ``force`` (if any) and records the phase."""

    def __init__(self, data: Data, force: Callable[[nn.Module, Sequence[torch.optim.Optimizer]], None] | None = None):
        super().__init__(data=data, train_config=TrainConfig(epochs=0))
        self.force, self.phases, self.forcing_seconds = force, [], 0.0

    def train(self, model: nn.Module, *, epochs: int | None = None, phase: str = "train",
              extra_optimizers: Sequence[torch.optim.Optimizer] = (), **kwargs: Any) -> list[dict]:
        self.phases.append(phase)
        if self.force is not None and phase == "sparse":
            start = time.perf_counter()
            self.force(model, extra_optimizers)
            self.forcing_seconds += time.perf_counter() - start
        return []


def chosen(size: int, gen: torch.Generator) -> list[int]:
    """``int(RATIO * size)`` random indices (trimming's ``fraction`` rule removes as many)."""
    return sorted(torch.randperm(size, generator=gen)[: int(RATIO * size)].tolist())


@torch.no_grad()
def zero_channels(model: nn.Module, x: torch.Tensor, gen: torch.Generator, *, dead: bool) -> None:
    """Zero ``chosen`` filters (weight rows) of every producer of every channel group; ``dead`` also zeroes
    their biases and their BatchNorms' weight and bias, so that the channels are 0 through the activation."""
    for g in channel_groups(model, example_input=x):
        idx = chosen(g.size, gen)
        for m in [model.get_submodule(p) for p in g.producers]:
            m.weight[idx] = 0
            if dead and m.bias is not None:
                m.bias[idx] = 0
        for m in [model.get_submodule(b) for b in g.batchnorms] if dead else []:
            if m.weight is not None:
                m.weight[idx], m.bias[idx] = 0, 0
    if dead:
        silence_zero_inputs(model, x)


@torch.no_grad()
def silence_zero_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """Zero the affine entries of every BatchNorm whose input channel is exactly 0 on ``x``: a dead channel
    that a concatenation feeds to layers with their own BatchNorm (DenseNet) is then 0 through each of them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    for _ in range(2):  # a norm silenced in the first pass can reveal zeros to a later one
        zero: dict[nn.Module, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda m, a: zero.__setitem__(m, (a[0] == 0).transpose(0, 1)
                                                                            .flatten(1).all(1))) for m in norms]
        try:
            model.eval()(x)
        finally:
            for h in hooks:
                h.remove()
        for m, idx in zero.items():
            m.weight[idx], m.bias[idx] = 0, 0


@dataclasses.dataclass(frozen=True)
class MethodCell:
    """How one method's removal decision is forced: knobs over its search-space defaults, a zeroing of the
    model before ``compress`` (``mask``) or at its training phase (``force``); ``exact``: an error is measured."""

    params: Mapping[str, Any]
    mask: Callable[[nn.Module, torch.Tensor, torch.Generator], None] | None = None
    force: bool = False
    exact: bool = True
    adapt: Callable[[nn.Module, torch.Tensor], Mapping[str, Any]] | None = None  # knobs that depend on the model


def sss_level(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """The first SSS ``level`` of both, channel, block that finds structures in ``model``; both if none (the cell
    is then refused up front, with the method's line)."""
    for level in ("both", "channel", "block"):
        try:
            structures(model, level=level, example_input=x)
            return {"level": level}
        except UsageError:
            continue
    return {"level": "both"}


CELLS = {
    "trimming": MethodCell({"rounds": 1, "rule": "fraction", "fraction": RATIO, "layers": "all",
                            "retrain_epochs": 1, "apoz_examples": 100},  # in range; nothing trains, 4 images
                           mask=lambda m, x, g: zero_channels(m, x, g, dead=True)),
    "l1l2": MethodCell({"threshold": 1e-3, "grouping": "filter", "layers": "all", "finetune_epochs": 0},
                       mask=lambda m, x, g: zero_channels(m, x, g, dead=False)),
    "sss": MethodCell({"level": "both", "threshold": 0.0, "finetune_epochs": 0}, force=True, adapt=sss_level),
    "iht": MethodCell({"keep_ratio": 1 - RATIO, "cycles": 1}, exact=False),
}


@torch.no_grad()
def zero_factors(optimizers: Sequence[torch.optim.Optimizer], gen: torch.Generator) -> None:
    """Zero ``chosen`` entries of every factor tensor the method trains with its own optimizer, and every
    third one-element factor (a block's)."""
    singles = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.numel() > 1:
                    p[chosen(p.numel(), gen)] = 0
                else:
                    p.mul_(0 if singles % 3 == 1 else 1)
                    singles += 1


# --- one cell ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    model: str
    method: str
    outcome: str
    params_before: int | None = None
    params_after: int | None = None
    error: float | None = None
    seconds: float | None = None
    message: str = ""


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s eval-mode output for ``x``, computed in float64 on a copy: float32 rounding, amplified
    through a hundred random layers, would reach 1e-5 by itself; in float64 any error above ~1e-12 is the
    removal's."""
    return copy.deepcopy(model).double().eval()(x.double())


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def random_data(x: torch.Tensor, num_classes: int = 1000) -> Data:
    split = Split(x, torch.arange(len(x)) % num_classes)
    return Data("random", split, split, split, num_classes)


def call_check(method: Method, **available: Any) -> None:
    """Run ``method.check`` if the method has one, passing the arguments it names among ``available``."""
    check = getattr(method, "check", None)
    if check is None:
        return
    names = inspect.signature(check).parameters
    check(**{k: v for k, v in available.items() if k in names})


def run_cell(model: nn.Module, x: torch.Tensor, *, method: Method, spec: MethodCell, name: str = "model",
             seed: int = 0) -> Cell:
    """Force ``method``'s removal decision on ``model`` (modified in place) and classify the outcome."""
    gen = torch.Generator().manual_seed(seed)
    before = count_params(model)
    ref: dict[str, torch.Tensor] = {}
    if spec.mask is not None:
        with contextlib.suppress(UsageError):  # the analysis refuses the model: the method is run unmasked
            spec.mask(model, x, gen)
            ref["out"] = outputs(calibrate(model, x), x)

    def force(m: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        zero_factors(optimizers, gen)
        ref["out"] = outputs(m, x)

    ctx = ForcingContext(random_data(x), force if spec.force else None)
    params = method.search_space().complete({**spec.params, **(spec.adapt(model, x) if spec.adapt else {})},
                                            where=f"bench_zoo {method.name}")
    cell = Cell(name, method.name, "", before)
    start = time.perf_counter()
    try:
        call_check(method, model=model, params=params, ctx=ctx, example_input=x, data=ctx.data)
        result = method.compress(model, ctx, params)
    except UsageError as e:
        cell.outcome, cell.message = f"refused {'late' if ctx.phases else 'up front'}", one_line(e)
        return cell
    cell.seconds = time.perf_counter() - start - ctx.forcing_seconds
    cell.params_after = count_nonzeros(result.model) if result.sparse else count_params(result.model)
    if spec.exact and "out" in ref:
        cell.error = rel_error(outputs(result.model, x), ref["out"])
    cell.outcome = classify(before, cell.params_after, cell.error)
    if cell.outcome == "compressed" and spec.exact and cell.error is None:
        cell.message = "error not measured: no masked model (the channel analysis refused the masking)"
    return cell


def classify(before: int, after: int, error: float | None) -> str:
    if after >= before:
        return "nothing removed"
    return "inexact" if error is not None and not error < ERROR_LIMIT else "compressed"


def run_heads_cell(model: nn.Module, x: torch.Tensor, *, name: str = "model", seed: int = 0) -> Cell:
    """Remove ``chosen`` heads of every attention layer; compare with the mask."""
    gen = torch.Generator().manual_seed(seed)
    heads = {g.name: (g, chosen(g.num_heads, gen)) for g in head_groups(model)}
    if not heads:
        return Cell(name, "heads", "n/a", message="no attention layer")
    mask_heads(model, {n: drop for n, (_, drop) in heads.items()})
    ref = outputs(model, x)
    start = time.perf_counter()
    small = remove_heads(model, {n: sorted(set(range(g.num_heads)) - set(d)) for n, (g, d) in heads.items()})
    seconds = time.perf_counter() - start
    before, after = count_params(model), count_params(small)
    error = rel_error(outputs(small, x), ref)
    return Cell(name, "heads", classify(before, after, error), before, after, error, seconds,
                f"{sum(len(d) for _, d in heads.values())} heads")


# --- one short real trial ------------------------------------------------------------------------------------------
TRIAL_PARAMS = {
    "trimming": {"rounds": 1, "rule": "fraction", "fraction": RATIO, "layers": "all", "retrain_epochs": 1,
                 "apoz_examples": 100},
    "l1l2": {"lambda": 1.0, "threshold": 1e-2, "finetune_epochs": 0},
    "sss": {"gamma": 0.05, "threshold": 0.0, "finetune_epochs": 0},
    "iht": {"keep_ratio": 1 - RATIO, "cycles": 1, "sparse_epochs": 1, "dense_epochs": 1},
}


class _EpochSeen(Callback):
    def __init__(self) -> None:
        self.epochs = 0

    def on_epoch_end(self, model, record) -> None:
        self.epochs += 1


def run_trial_cell(name: str, method: str, *, size: int = 32) -> Cell:
    """One trial of ``method`` on torchvision's ``name`` through :func:`autoslim.run_trial` (synthetic data)."""
    size = input_size(name, size)
    registered = f"torchvision.{name}"
    if registered not in list_models():
        register_model(registered)(lambda *, in_shape, num_classes, _n=name: build(_n, in_shape[-1],
                                                                                 num_classes=num_classes))
    data = load_data(DataConfig(name="synthetic", image_shape=[3, size, size], num_classes=4, num_samples=64))
    config = TrialConfig(method=method, params=get_method(method).search_space().complete(
                             TRIAL_PARAMS[method], where=f"bench_zoo {method}"),
                         model=registered, train=TrainConfig(epochs=1, batch_size=16))
    seen, lines = _EpochSeen(), []
    start = time.perf_counter()
    try:
        result = run_trial(config, data=data, callbacks=[seen], log=lines.append)
    except UsageError as e:
        return Cell(name, method, f"refused {'late' if seen.epochs else 'up front'}", message=one_line(e))
    cell = Cell(name, method, classify(result.baseline_params, result.params, None), result.baseline_params,
                result.params, None, time.perf_counter() - start, lines[-1] if lines else "")
    return cell


# --- limits --------------------------------------------------------------------------------------------------------
class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`CellTimeout` in this (main) thread after ``seconds``."""
    def handler(signum, frame):
        raise CellTimeout(f"over the time limit of {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def guarded(name: str, method: str, limit: int, fn: Callable[[], Cell]) -> Cell:
    """``fn()``, any exception but a refusal classified as ``crashed``/``timeout`` in one line."""
    try:
        with time_limit(limit):
            return fn()
    except CellTimeout as e:
        return Cell(name, method, "timeout", message=str(e))
    except Exception as e:  # the point of the benchmark: every failure is reported, none stops it
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Cell(name, method, "crashed",
                    message=f"{type(e).__name__}: {one_line(e)[:300]} ({where.filename.split('/')[-1]}:{where.lineno})")


def run_model(name: str, methods: Sequence[str], *, size: int, max_params: float, limit: int) -> list[Cell]:
    """Every method's cell for one model, each on its own copy of one randomised model."""
    size = input_size(name, size)
    n = n_params(name, size)
    if n > max_params:
        return [Cell(name, m, "skipped", n, message=f"too large at this input: {n:,} params > --max-params")
                for m in methods]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_IMAGES, 3, size, size, generator=gen)
    try:
        base = randomize(build(name, size), x, gen)
        outputs(base, x)
    except Exception as e:
        return [Cell(name, m, "skipped", n, message=f"does not run at {size}x{size}: {one_line(e)[:200]}")
                for m in methods]
    cells = []
    for method in methods:
        if method == "heads":
            cells.append(guarded(name, method, limit, lambda: run_heads_cell(copy.deepcopy(base), x, name=name)))
        else:
            cells.append(guarded(name, method, limit, lambda: run_cell(
                copy.deepcopy(base), x, method=get_method(method), spec=CELLS[method], name=name)))
    return cells


# --- report --------------------------------------------------------------------------------------------------------
def short(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def cell_text(c: Cell, notes: dict[str, int]) -> str:
    if c.outcome in ("compressed", "inexact"):
        removed = 1 - c.params_after / c.params_before
        text = f"-{removed:.1%}" if removed >= MARGINAL else f"-{removed:.3%} (<1%)"
        if c.error is not None:
            text += f" · {c.error:.0e}"
        text += f" · {c.seconds:.1f}s"
        return text if c.outcome == "compressed" else f"**INEXACT** {text}"
    if c.outcome == "n/a" or c.outcome == "nothing removed" and not c.message:
        return c.outcome
    key = f"{c.outcome}: {c.message}"
    note = notes.setdefault(key, len(notes) + 1)
    label = {"nothing removed": "**nothing removed**", "crashed": "**CRASHED**", "refused late": "refused late",
             "timeout": "**timeout**"}.get(c.outcome, c.outcome)
    return f"{label} [{note}]"


def table(cells: Sequence[Cell], methods: Sequence[str], *, title: str) -> list[str]:
    """A markdown table (model x method) followed by the numbered notes its cells refer to."""
    by_model: dict[str, dict[str, Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model, {})[c.method] = c
    notes: dict[str, int] = {}
    lines = [f"| {title} | family | params | " + " | ".join(methods) + " |",
             "|---" * (3 + len(methods)) + "|"]
    for model, row in by_model.items():
        before = next((c.params_before for c in row.values() if c.params_before), None)
        lines.append(f"| {model} | {family_of(model)} | {short(before)} | "
                     + " | ".join(cell_text(row[m], notes) if m in row else "" for m in methods) + " |")
    lines += ["", *(f"{i}. {text}" for text, i in notes.items())]
    return lines


def summary(cells: Sequence[Cell], methods: Sequence[str]) -> list[str]:
    """Per family and method: models compressed exactly / models run; then the issue's targets."""
    run = [c for c in cells if c.outcome not in ("skipped",)]
    families = [f for f in FAMILIES if any(family_of(c.model) == f for c in run)]
    lines = ["| family | models | " + " | ".join(methods) + " |", "|---" * (2 + len(methods)) + "|"]
    won: dict[str, int] = dict.fromkeys(methods, 0)
    won_1pc: dict[str, int] = dict.fromkeys(methods, 0)  # every model of the family loses at least 1%
    seen: dict[str, int] = dict.fromkeys(methods, 0)  # families the method applies to
    for f in families:
        row = []
        for m in methods:
            applicable = [c for c in run if family_of(c.model) == f and c.method == m and c.outcome != "n/a"]
            ok = [c for c in applicable if c.outcome == "compressed"]
            seen[m] += bool(applicable)
            won[m] += bool(applicable) and len(ok) == len(applicable)
            won_1pc[m] += bool(applicable) and all(c.params_after <= (1 - MARGINAL) * c.params_before
                                                   for c in ok) and len(ok) == len(applicable)
            row.append(f"{len(ok)}/{len(applicable)}" if applicable else "n/a")
        models = len({c.model for c in run if family_of(c.model) == f})
        lines.append(f"| {f} | {models} | " + " | ".join(row) + " |")
    applicable = [c for c in run if c.outcome != "n/a"]
    bad = [c for c in applicable if c.outcome not in ("compressed", "refused up front")]
    errors = [c.error for c in run if c.error is not None]
    lines += ["", "Targets (issue 16, item 6):", "",
              f"- every cell compressed or refused up front: {len(applicable) - len(bad)}/{len(applicable)} cells"
              + (f"; the others: {_counts(bad)}" if bad else ""),
              "- compressed (every model of the family, exactly) in at least 90% of the families: "
              + ", ".join(f"{m} {won[m]}/{seen[m]}" for m in methods)
              + "; removing at least 1% of every model's parameters: "
              + ", ".join(f"{m} {won_1pc[m]}/{seen[m]}" for m in methods),
              f"- removal error below {ERROR_LIMIT:g} everywhere: "
              + (f"max {max(errors):.1e} over {len(errors)} measured cells, "
                 f"{sum(not e < ERROR_LIMIT for e in errors)} above" if errors else "no cell measured")]
    return lines


def _counts(cells: Sequence[Cell]) -> str:
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def report(cells: Sequence[Cell], trials: Sequence[Cell], methods: Sequence[str], *, command: str,
           size: int, seconds: float) -> str:
    skipped = sorted({f"{c.model} ({c.message})" for c in cells if c.outcome == "skipped"})
    lines = [
        f"# The torchvision zoo: what each method's removal step does ({datetime.date.today()})", "",
        f"Machine: {_cpu()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}. Command: `{command}` ({seconds / 60:.0f} min). "
        f"Input {size}x{size} (inception_v3 75, maxvit_t 224, ViT: image_size = input). "
        "How a cell is measured: the docstring of `benchmarks/bench_zoo.py`. A cell: share of the parameters "
        "removed · max relative output error against the masked model · wall time of the removal step. "
        "`heads`: 30% of the attention heads (`autoslim.surgery.heads`, surgery only: no method "
        "uses it yet). The issue's targets concern trimming, l1l2 and sss.", "",
        *table(cells, methods, title="model"), "", "## Per family", "", *summary(cells, methods)]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    if trials:
        lines += ["", "## One short trial (synthetic data, one epoch)", "",
                  *table(trials, [m for m in methods if m in TRIAL_PARAMS], title="model")]
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        return f"{os.cpu_count()} CPU cores ({model})"
    return platform.processor() or "CPU"


def run_all(args: argparse.Namespace, models: Sequence[str]) -> tuple[list[Cell], list[Cell]]:
    """Every model's cells, then the trials if asked; one progress line per cell."""
    start = time.perf_counter()
    cells, trials = [], []
    for i, name in enumerate(models, 1):
        for c in run_model(name, args.methods, size=args.input_size, max_params=args.max_params,
                           limit=args.time_limit):
            cells.append(c)
            print(f"[{i}/{len(models)} {time.perf_counter() - start:6.0f}s] {name:22s} {c.method:9s} "
                  f"{c.outcome:16s} {short(c.params_before):>8s} -> {short(c.params_after):>8s} "
                  f"err {'' if c.error is None else f'{c.error:.1e}':8s} {c.message[:150]}", flush=True)
    for name in args.trial_models if args.trial else []:
        for method in (m for m in args.methods if m in TRIAL_PARAMS):
            c = guarded(name, method, args.time_limit, lambda: run_trial_cell(name, method))
            trials.append(c)
            print(f"[trial] {name:22s} {method:9s} {c.outcome:16s} {short(c.params_before):>8s} -> "
                  f"{short(c.params_after):>8s} {c.message[:150]}", flush=True)
    return cells, trials


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model names or families (default: the whole zoo)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--max-params", type=float, default=200e6, help="skip larger models (memory)")
    parser.add_argument("--time-limit", type=int, default=900, help="seconds per cell")
    parser.add_argument("--trial", action="store_true", help="also one short real trial per method")
    parser.add_argument("--trial-models", nargs="*", default=list(TRIAL_MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", help="write the report (markdown) to this file")
    parser.add_argument("--json", help="write every cell (JSON) to this file")
    parser.add_argument("--report-from", help="run nothing: the report of the cells a --json run wrote")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_from:
        with open(args.report_from) as f:
            saved = json.load(f)
        cells, trials = ([Cell(**c) for c in saved[k]] for k in ("cells", "trials"))
        command, seconds, args.methods, args.input_size = (saved[k] for k in ("command", "seconds", "methods", "size"))
    else:
        try:
            models = select_models(args.models)
        except UsageError as e:
            parser.exit(2, f"bench_zoo: error: {e}\n")
        start = time.perf_counter()
        cells, trials = run_all(args, models)
        seconds = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "seconds": seconds, "methods": args.methods, "size": args.input_size,
                       "cells": [dataclasses.asdict(c) for c in cells],
                       "trials": [dataclasses.asdict(c) for c in trials]}, f, indent=1)
    text = report(cells, trials, args.methods, command=command, size=args.input_size, seconds=seconds)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
