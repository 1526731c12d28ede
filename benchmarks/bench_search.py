"""autoslim's search on a budget against the searches a user would assemble, at the same wall clock (issue 20).

Four searches for networks of at most 10,000 parameters on the same MNIST split
(``--data digits`` for a quick offline check), run at once with ``--parallel``
(one process per search, one torch thread each: the same wall clock and an
equal share of the machine), else one after the other:

(a) autoslim given only the budget: ``studies/budget_mnist.yaml`` (every method on
    its default space, ``constraints: {max_params: 10000}``, TPE, early stopping, warm start);
(n) autoslim's hand-narrowed study, ``studies/search_mnist.yaml`` (ranges found beforehand
    by a grid over this very model and data, ``benchmarks/explore_search_space.py``);
(p) the structured peer a user would assemble from Torch-Pruning (``pip install -e ".[bench]"``):
    LeNet-5 trained once (the studies' ``train`` section), then Optuna's TPE over
    Torch-Pruning's global channel-pruning ratio (``MetaPruner``, ``MagnitudeImportance(p=2)``,
    ``global_pruning=True``, the final classifier ignored; ratio 0.5-0.995) and the fine-tune's
    epochs (1 to the studies' epochs) and learning rate (1e-3 to 0.1, log); one trial copies
    the base, prunes, fine-tunes and evaluates; parameters counted on the pruned dense model;
(c) the hand-rolled Optuna + ``torch.nn.utils.prune`` study: TPE over the ratio of global L1
    unstructured pruning, each trial training LeNet-5 from scratch, pruning and
    fine-tuning (non-zero parameters counted).

Every search stops at the budget: (a) and (n) through ``optimize(timeout=...,
strict_timeout=True)``; (p) and (c) start no trial after it and stop a running
one (or the base training) at its next optimizer step. A trial stopped so counts
as stopped, with no result. The budget of (p) and (c) starts after they load
the data (the base training of (p) is inside it); that of (a) and (n) after
autoslim's set-up (loading the data, checking the methods against the model,
queueing the study's trials), which their times to 99% below do include. A study
that autoslim refuses at that check is reported with autoslim's one line, and
the other searches go on.

Printed for each search (completed trials only, feasible or not, all alike):

- *box hypervolume*: the share of one box, the same for all, that its front dominates:
  validation error 0-5% by log10 parameters from 2 to log10 of the study model's
  size (LeNet-5 on MNIST: 431,080), normalised to [0, 1]^2
  (:func:`autoslim.search.pareto.box_hypervolume`). A point outside the box
  contributes its clipped part: below 100 parameters it counts as if at 100;
  above 5% error or the model's size it contributes nothing.
- *log hypervolume* (what this script printed before issue 20): accuracy from 90%
  by log10 parameters from 0 to the model's size, in accuracy x decades;
- the best test accuracy, selected by validation accuracy, under 10,000 and under 5,000
  parameters; the share of completed trials within 10,000 parameters; the time from the
  search's start to its first network of at least 99.0% test accuracy within 10,000
  parameters; the number of trials (completed, stopped, failed).

Then the box-hypervolume ratios against the targets: (a)/(p) and (a)/(c) at least
1.2, (a)/(n) at least 0.95; and for (a), a network of at least 99.0% test accuracy
with at most 8,000 parameters, selected by validation (the issue sets it for (a)
alone on 2 cores for an hour: ``--arms a --budget 3600``).

    python benchmarks/bench_search.py --budget 1800 --parallel [--arms apnc] [--data-dir ../shared/datasets]
        [--out /tmp/bench_search]   # the four study databases and logs; never inside the repository
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import torch.nn.utils.prune as prune
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoslim.config import load_study
from autoslim.data import Data, load_data
from autoslim.errors import UsageError
from autoslim.measure import count_nonzeros, count_params
from autoslim.models import create_model
from autoslim.search.pareto import box_hypervolume, hypervolume, pareto_mask
from autoslim.study import optimize
from autoslim.train import Callback, evaluate, resolve_device, seed_everything, train

try:
    import torch_pruning as tp
except ImportError:
    print('bench_search: torch-pruning is not installed (arm p): pip install -e ".[bench]"', file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"a": "budget_mnist.yaml", "n": "search_mnist.yaml"}
NAMES = {"a": "autoslim, default spaces, budget only", "n": "autoslim, hand-narrowed search_mnist.yaml",
         "p": "Torch-Pruning peer (train once, TPE)", "c": "hand-rolled Optuna + torch prune"}
TARGETS = {"p": 1.2, "c": 1.2, "n": 0.95}  # box-hypervolume ratio (a)/(k) at least this
DIRECTIONS = ["maximize", "minimize"]
LIMIT, SMALL, TARGET_PARAMS, TARGET_TEST = 10_000, 5_000, 8_000, 0.99
MAX_ERROR, MIN_LOG_PARAMS, LOG_MIN_ACCURACY = 0.05, 2.0, 0.90


class BudgetReached(Callback):
    """Stops training at the first optimizer step after ``deadline`` (a ``time.time()``): the trial is stopped."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_step_end(self, model, step) -> None:
        if time.time() > self.deadline:
            raise optuna.TrialPruned("the budget was reached")


def study_config(arm: str, *, data_dir: str, data: str):
    """The study of (a) or (n); (p) and (c) use (n)'s data and training."""
    cfg = load_study(ROOT / "studies" / STUDIES[arm])
    cfg.data.data_dir = data_dir
    if data != cfg.data.name:  # another dataset for a quick check: all of it, for every method
        cfg.data.name, cfg.data.train_subset = data, None
        for method in cfg.methods.values():
            method.data = {}
    return cfg


def finish(trial: optuna.Trial, model: nn.Module, data: Data, *, params: int, deadline: float) -> tuple[float, int]:
    """Evaluate a trial of (p) or (c); stop it if it ended after the budget."""
    if time.time() > deadline:
        raise optuna.TrialPruned("finished after the budget")
    trial.set_user_attr("test_accuracy", evaluate(model, data.test))
    trial.set_user_attr("params", params)
    return evaluate(model, data.val), params


def torch_pruning_step(model: nn.Module, *, ratio: float, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's global L2-magnitude channel pruning of ``model`` in place, its final classifier kept."""
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=ratio, ignored_layers=[classifier])
    pruner.step()
    return model


def peer(data: Data, *, cfg, deadline: float, study: optuna.Study) -> optuna.Study:
    """(p): LeNet-5 trained once, then TPE over Torch-Pruning's global ratio and the fine-tune."""
    seed_everything(cfg.seed)
    base = create_model(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes)
    began = time.time()
    try:
        train(base, data, config=cfg.train, seed=cfg.seed, callbacks=[BudgetReached(deadline)])
    except optuna.TrialPruned:
        study.set_user_attr("note", f"the budget ran out while the base {cfg.model} trained: no trial")
        return study
    study.set_user_attr("note", f"base {cfg.model} trained in {time.time() - began:.0f} s: "
                                f"{evaluate(base, data.val):.2%} val, {evaluate(base, data.test):.2%} test")
    example = data.val.x[:1]

    def objective(trial: optuna.Trial) -> tuple[float, int]:
        trial.set_user_attr("method", "tp-global-l2")
        ratio = trial.suggest_float("ratio", 0.5, 0.995)
        tune = dataclasses.replace(cfg.train, epochs=trial.suggest_int("finetune_epochs", 1, cfg.train.epochs),
                                   lr=trial.suggest_float("finetune_lr", 1e-3, 0.1, log=True))
        model = torch_pruning_step(copy.deepcopy(base), ratio=ratio, example=example)
        train(model, data, config=tune, seed=cfg.seed + trial.number, callbacks=[BudgetReached(deadline)])
        return finish(trial, model, data, params=count_params(model), deadline=deadline)

    study.optimize(objective, timeout=max(0.0, deadline - time.time()))
    return study


def hand_rolled(data: Data, *, cfg, deadline: float, study: optuna.Study) -> optuna.Study:
    """(c): the study a user writes without autoslim: train, prune globally (L1, unstructured), fine-tune."""
    stop = [BudgetReached(deadline)]

    def objective(trial: optuna.Trial) -> tuple[float, int]:
        trial.set_user_attr("method", "torch-prune")
        ratio = trial.suggest_float("ratio", 0.5, 0.995)
        seed_everything(cfg.seed + trial.number)
        model = create_model(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes)
        train(model, data, config=cfg.train, seed=cfg.seed + trial.number, callbacks=stop)
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=ratio)
        tune = dataclasses.replace(cfg.train, epochs=max(1, cfg.train.epochs // 3), lr=0.005)
        train(model, data, config=tune, seed=cfg.seed, callbacks=stop)
        for m, name in layers:
            prune.remove(m, name)
        return finish(trial, model, data, params=count_nonzeros(model), deadline=deadline)

    study.optimize(objective, timeout=max(0.0, deadline - time.time()))
    return study


@dataclasses.dataclass
class Outcome:
    """What one search did: its finished trials, when it started (``time.time()``), and a line to know."""

    trials: list[FrozenTrial]
    start: float
    note: str = ""      # (p): its base training; a refused study: autoslim's line
    ran: bool = True    # False: autoslim refused the study before any trial


def run_arm(arm: str, *, budget: float, data_dir: str, data: str, out: Path, threads: int | None) -> Outcome:
    """Run search ``arm`` for ``budget`` seconds, its study in ``out/<arm>.db`` and its log in ``out/<arm>.log``."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / arm}.db"
    with open(out / f"{arm}.log", "w") as logfile:
        if arm in STUDIES:
            start = time.time()
            # the study file's n_trials (200) is far more than a budget of an hour holds; each is queued at set-up
            study = optimize(study_config(arm, data_dir=data_dir, data=data), timeout=budget, strict_timeout=True,
                             storage=storage, log=lambda line: print(line, file=logfile, flush=True))
            return Outcome([t for t in study.trials if t.state.is_finished()], start)  # not the slots queued later
        cfg = study_config("n", data_dir=data_dir, data=data)
        split = load_data(cfg.data, device=resolve_device(cfg.device))
        start = time.time()
        study = optuna.create_study(storage=storage, study_name=arm, directions=DIRECTIONS,
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed))
        study = (peer if arm == "p" else hand_rolled)(split, cfg=cfg, deadline=start + budget, study=study)
        note = study.user_attrs.get("note", "")
        for line in [note] * bool(note) + [trial_summary(t, start) for t in study.trials]:
            print(line, file=logfile)
        return Outcome(study.trials, start, note)


def _run_arm_job(job: tuple) -> tuple[str, Outcome, float]:
    arm, kwargs = job
    began = time.time()
    try:
        outcome = run_arm(arm, **kwargs)
    except UsageError as e:  # (a) or (n): refused before any trial (optimize checks the study first)
        outcome = Outcome([], began, f"refused by autoslim before any trial: {e}", ran=False)
    return arm, outcome, time.time() - began


# ---------------------------------------------------------------- what each search found

def completed(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def best_under(trials: list[FrozenTrial], limit: int) -> FrozenTrial | None:
    """The completed trial of highest validation accuracy within ``limit`` parameters."""
    return max((t for t in completed(trials) if t.values[1] <= limit), key=lambda t: t.values[0], default=None)


def first_at(trials: list[FrozenTrial], start: float, *, test: float, limit: int) -> float | None:
    """Seconds from ``start`` to the first completed trial of at least ``test`` accuracy within ``limit`` params."""
    ends = [t.datetime_complete.timestamp() - start for t in completed(trials)
            if t.values[1] <= limit and t.user_attrs["test_accuracy"] >= test]
    return min(ends, default=None)


def box_hv(trials: list[FrozenTrial], size: int) -> float:
    """The box hypervolume: validation error 0-5% by log10 parameters 2 to log10(``size``), normalised."""
    points = [[1 - t.values[0], math.log10(max(t.values[1], 1))] for t in completed(trials)]
    return box_hypervolume(points, lower=[0.0, MIN_LOG_PARAMS], upper=[MAX_ERROR, math.log10(size)])


def log_hv(trials: list[FrozenTrial], size: int) -> float:
    """Area dominated in (accuracy from 90%, log10 parameters from 0 to log10(``size``)): accuracy x decades."""
    decades = math.log10(size)  # hypervolume() divides a minimised objective by its reference: undo it
    logged = [[t.values[0], math.log10(max(t.values[1], 1))] for t in completed(trials)]
    return hypervolume(logged, DIRECTIONS, [LOG_MIN_ACCURACY, decades]) * decades if logged else 0.0


def trial_summary(t: FrozenTrial, start: float) -> str:
    """'4 thriftynet complete at 1028s (98.80% val, 99.05% test, 9,629 params)'; no result for a stopped trial."""
    end = f" at {t.datetime_complete.timestamp() - start:.0f}s" if t.datetime_complete else ""
    line = f"{t.number} {t.user_attrs.get('method', t.params.get('method', '-'))} {t.state.name.lower()}{end}"
    if t.state == TrialState.COMPLETE:
        line += (f" ({100 * t.values[0]:.2f}% val, {100 * t.user_attrs['test_accuracy']:.2f}% test, "
                 f"{int(t.values[1]):,} params)")
    return line


def best_text(trial: FrozenTrial | None) -> str:
    if trial is None:
        return "none"
    acc, val, params = trial.user_attrs["test_accuracy"], trial.values[0], int(trial.values[1])
    return f"{100 * acc:.2f}% test ({100 * val:.2f}% val) at {params:,} params"


def print_arm(k: str, outcome: Outcome, *, size: int, box: float) -> None:
    """The figures of search ``k``."""
    trials, done = outcome.trials, completed(outcome.trials)
    states = {st: sum(t.state == st for t in trials) for st in (TrialState.PRUNED, TrialState.FAIL)}
    feasible = f"{sum(t.values[1] <= LIMIT for t in done) / len(done):.0%}" if done else "-"
    first = first_at(trials, outcome.start, test=TARGET_TEST, limit=LIMIT)
    print(f"({k}) {NAMES[k]}" + (f"; {outcome.note}" if outcome.note else "") + "\n"
          f"    trials {len(trials)} ({len(done)} complete, {states[TrialState.PRUNED]} stopped, "
          f"{states[TrialState.FAIL]} failed); within {LIMIT:,} params: {feasible} of the completed\n"
          f"    hypervolume box {box:.4f}, log {log_hv(trials, size):.4f}\n"
          f"    best <= {LIMIT:,}: {best_text(best_under(trials, LIMIT))}; "
          f"best <= {SMALL:,}: {best_text(best_under(trials, SMALL))}\n"
          f"    first >= {TARGET_TEST:.1%} test within {LIMIT:,} params: "
          f"{'never' if first is None else f'after {first:.0f} s'}")


def print_targets(boxes: dict[str, float], a: Outcome) -> None:
    """The ratios (a)/(k) in the box and (a)'s 8,000-parameter network against their targets."""
    for k, target in TARGETS.items():
        if k in boxes:
            ratio = boxes["a"] / boxes[k] if boxes[k] > 0 else (math.inf if boxes["a"] > 0 else math.nan)
            verdict = "undefined: both 0" if math.isnan(ratio) else "met" if ratio >= target else "missed"
            print(f"box hypervolume ratio (a)/({k}): {ratio:.3f}  (target >= {target}: {verdict})")
    best = best_under(a.trials, TARGET_PARAMS)
    met = best is not None and best.user_attrs["test_accuracy"] >= TARGET_TEST
    print(f"(a) best <= {TARGET_PARAMS:,} params: {best_text(best)}  (target >= {TARGET_TEST:.1%} test: "
          f"{'met' if met else 'missed'})")


def print_trials(k: str, outcome: Outcome) -> None:
    """Search ``k``'s trials, and its Pareto front with each point's knobs."""
    print(f"\n({k}) trials: " + ("; ".join(trial_summary(t, outcome.start) for t in outcome.trials) or "none"))
    done = completed(outcome.trials)
    front = [t for t, keep in zip(done, pareto_mask([t.values for t in done], DIRECTIONS)) if keep] if done else []
    print(f"({k}) Pareto front of the completed trials:" + ("" if front else " none"))
    for t in sorted(front, key=lambda t: t.values[1]):
        knobs = " ".join(f"{n.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{n.split('.')[-1]}={v}"
                         for n, v in t.params.items() if n != "method")
        print(f"    trial {t.number:>3} {t.user_attrs['method']:<12} val {100 * t.values[0]:.2f}%  "
              f"params {int(t.values[1]):>7,}  test {100 * t.user_attrs['test_accuracy']:.2f}%  {knobs}")


def report(outcomes: dict[str, Outcome], *, size: int) -> None:
    """Print each search's figures (or why it did not run), the ratios against their targets, its trials and
    its front."""
    ran = {k: o for k, o in outcomes.items() if o.ran}
    for k, o in outcomes.items():
        if not o.ran:
            print(f"({k}) {NAMES[k]}: {o.note}")
    boxes = {k: box_hv(o.trials, size) for k, o in ran.items()}
    for k, o in ran.items():
        print_arm(k, o, size=size, box=boxes[k])
    if "a" in ran:
        print()
        print_targets(boxes, ran["a"])
    for k, o in ran.items():
        print_trials(k, o)


# ---------------------------------------------------------------- command line

def check_args(args) -> Path:
    """Refuse bad arguments in one line (exit 2); the folder for the study databases."""
    if not args.arms or set(args.arms) - set(NAMES):
        raise UsageError(f"--arms: {args.arms!r}; accepted: letters of {''.join(NAMES)!r}")
    if args.budget <= 0:
        raise UsageError(f"--budget: {args.budget:g}; accepted: seconds > 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: {args.threads}; accepted: a whole number >= 1")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_search-")).resolve()
    if out == ROOT or ROOT in out.parents:
        raise UsageError(f"--out: {out} is inside the repository; accepted: a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    held = [f"{k}.db" for k in args.arms if (out / f"{k}.db").exists()]
    if held:  # an autoslim study would resume there, not start over
        raise UsageError(f"--out: {out} already holds {', '.join(held)}; accepted: a folder without them")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1800, help="wall-clock seconds of each search")
    ap.add_argument("--arms", default="apnc", help="which searches to run: letters of 'apnc'")
    ap.add_argument("--parallel", action="store_true",
                    help="run the searches at once, each in its own process with --threads torch threads "
                         "(default 1): every search gets the same wall clock and an equal share of the cores")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per search (default: torch's own; 1 with --parallel)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"), help="where the MNIST files are")
    ap.add_argument("--data", default="mnist", choices=["mnist", "digits"],
                    help="digits: scikit-learn's 8x8 digits, all of them, for a quick offline check of the script")
    ap.add_argument("--out", default=None, help="folder for the study databases and logs, outside the repository "
                                                "(default: a new temporary folder)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        out = check_args(args)
        cfg = study_config("n", data_dir=args.data_dir, data=args.data)
        data = load_data(cfg.data, device=resolve_device(cfg.device))  # checks the files before any search runs
    except UsageError as e:
        print(f"bench_search: {e}", file=sys.stderr)
        return 2
    size = count_params(create_model(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes))
    arms = [k for k in NAMES if k in args.arms]
    threads = args.threads or (1 if args.parallel else None)
    jobs = [(k, dict(budget=args.budget, data_dir=args.data_dir, data=args.data, out=out, threads=threads))
            for k in arms]
    print(f"{'at once, each' if args.parallel else 'one after the other, each'} with "
          f"{threads or torch.get_num_threads()} torch thread(s) on {os.cpu_count()} cores, {args.budget:.0f} s each: "
          f"{', '.join(arms)}; studies and logs in {out}", flush=True)
    results = {}
    with mp.get_context("spawn").Pool(len(jobs)) if args.parallel else contextlib.nullcontext() as pool:
        for k, outcome, seconds in (pool.imap_unordered(_run_arm_job, jobs) if pool else map(_run_arm_job, jobs)):
            print(f"({k}) done in {seconds:.0f} s", flush=True)
            results[k] = outcome
    print(f"\n{args.data}, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
          f"{cfg.model} {size:,} params; box: validation error 0-{MAX_ERROR:.0%} x log10 params "
          f"{MIN_LOG_PARAMS:g}-{math.log10(size):.3f}\n")
    report({k: results[k] for k in arms}, size=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
