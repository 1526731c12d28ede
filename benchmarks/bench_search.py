"""autoslim's search against random search and a hand-rolled pruning study, same wall-clock budget each.

Runs on the same MNIST split, one after the other in one process (each search
with all cores), or with ``--parallel`` all at once, each in its own process
with one torch thread, so that every search has the same wall-clock hour and an
equal share of the machine:

(a) autoslim's default search (``studies/search_mnist.yaml``: every method, TPE, early stopping);
(b) the same space with Optuna's random sampler and no early stopping;
(c) what a user would write by hand: Optuna's TPE over the pruning ratio of
    ``torch.nn.utils.prune`` global L1 magnitude pruning of LeNet-5 (train,
    prune, fine-tune; non-zero parameters counted).

and prints each one's hypervolume, the ratios (a)/(b) and (a)/(c) (target: at
least 1.2), and each one's best model under 10,000 parameters (test accuracy
and parameters; target for (a): at least 99.0% within an hour on 2 cores).

Two hypervolumes, each against one reference point for all three searches:

- *linear*: autoslim's own (``autoslim show``): accuracy from 0, parameters as a
  fraction of LeNet-5's 431,080; the front's area lies in [0, 1]. One network
  at 98% and ten times smaller than LeNet-5 already scores 0.88, and no front
  scores more than 1, so no search can score 1.2 times another that found such
  a network: on this scale the ratio target says nothing about the search.
- *log*: accuracy from 90% (a 7,850-parameter linear classifier reaches about
  92% on MNIST), parameters on a log10 scale up to LeNet-5's; the area is in
  accuracy x decades of compression. This is the scale compression results are
  read on (10x and 100x smaller are one decade apart), and it was fixed before
  the hour-long runs recorded in docs/benchmarks.md.

    python benchmarks/bench_search.py --budget 1200 [--parallel] [--arms abc] [--data-dir ../shared/datasets]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import torch
import torch.nn.utils.prune as prune
from optuna.trial import FrozenTrial, TrialState

from autoslim.config import TrainConfig, load_study
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.measure import count_nonzeros
from autoslim.models import create_model
from autoslim.search.pareto import hypervolume, pareto_mask
from autoslim.study import optimize
from autoslim.train import evaluate, resolve_device, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = [0.0, 431080.0]
LOG_REFERENCE = [0.90, 431080.0]
DIRECTIONS = ["maximize", "minimize"]


def hand_rolled(data, *, budget: float, epochs: int, seed: int) -> optuna.Study:
    """(c): the study a user writes without autoslim."""
    study = optuna.create_study(directions=DIRECTIONS, sampler=optuna.samplers.TPESampler(seed=seed))
    deadline = time.time() + budget  # Optuna's timeout lets the last trial run over; it does not count here
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05)

    def objective(trial: optuna.Trial):
        ratio = trial.suggest_float("ratio", 0.5, 0.995)
        seed_everything(seed + trial.number)
        model = create_model("lenet5", in_shape=data.in_shape, num_classes=10)
        train(model, data, config=cfg, seed=seed + trial.number)
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=ratio)
        train(model, data, config=TrainConfig(epochs=max(1, epochs // 3), batch_size=128, lr=0.005), seed=seed)
        for m, name in layers:
            prune.remove(m, name)
        if time.time() > deadline:
            raise optuna.TrialPruned("finished after the budget")
        acc, params = evaluate(model, data.val), count_nonzeros(model)
        trial.set_user_attr("test_accuracy", evaluate(model, data.test))
        trial.set_user_attr("params", params)
        return acc, params

    study.optimize(objective, timeout=budget)
    return study


def log_hypervolume(points, reference=LOG_REFERENCE) -> float:
    """Area dominated in (accuracy, log10 parameters) above ``reference``: accuracy x decades."""
    decades = np.log10(reference[1])  # hypervolume() divides a minimised objective by its reference: undo it
    logged = [[acc, np.log10(max(params, 1))] for acc, params in points]
    return hypervolume(logged, DIRECTIONS, [reference[0], decades]) * decades if logged else 0.0


def best_under(trials: list[FrozenTrial], limit: int):
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["params"] <= limit]
    best = max(done, key=lambda t: t.values[0], default=None)
    return (best.user_attrs["test_accuracy"], best.user_attrs["params"]) if best else (float("nan"), None)


def trial_summary(t: FrozenTrial) -> str:
    """'4 thriftynet complete 1028s (98.80% val, 99.05% test, 9,629 params)'; no result for a stopped trial."""
    line = f"{t.number} {t.params.get('method', 'prune')} {t.state.name.lower()} {t.duration.total_seconds():.0f}s"
    if t.state == TrialState.COMPLETE:
        line += (f" ({100 * t.values[0]:.2f}% val, {100 * t.user_attrs['test_accuracy']:.2f}% test, "
                 f"{int(t.values[1]):,} params)")
    return line


NAMES = {"a": "autoslim default (all methods, TPE, early stopping)",
         "b": "same space, random sampler, no early stopping",
         "c": "hand-rolled Optuna + torch prune (L1, LeNet-5)"}


def study_configs(data_dir: str):
    """The study configs of (a) and (b): ``studies/search_mnist.yaml``, and the same with random sampling,
    no early stopping and no warm start."""
    cfg = load_study(ROOT / "studies" / "search_mnist.yaml")
    cfg.data.data_dir = data_dir
    cfg_b = load_study(ROOT / "studies" / "search_mnist.yaml")
    cfg_b.data = cfg.data
    cfg_b.sampler.name, cfg_b.sampler.options = "random", {}
    cfg_b.early_stopping.enabled, cfg_b.warm_start = False, False
    return {"a": cfg, "b": cfg_b}


def run_arm(arm: str, *, budget: float, data_dir: str, threads: int | None) -> list[FrozenTrial]:
    """Run search ``arm`` for ``budget`` seconds (in-memory storage, no artifacts); its trials."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfgs = study_configs(data_dir)
    if arm == "c":
        cfg = cfgs["a"]
        data = load_data(cfg.data, device=resolve_device(cfg.device))
        return hand_rolled(data, budget=budget, epochs=cfg.train.epochs, seed=cfg.seed).trials
    return optimize(cfgs[arm], timeout=budget, strict_timeout=True, n_trials=10_000, log=lambda s: None,
                    storage="sqlite:///:memory:").trials


def _run_arm_job(job: tuple) -> tuple[str, list[FrozenTrial], float]:
    arm, kwargs = job
    start = time.perf_counter()
    return arm, run_arm(arm, **kwargs), time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=1200, help="wall-clock seconds for each of (a), (b), (c)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--limit", type=int, default=10_000, help="parameter limit of the reported best model")
    ap.add_argument("--arms", default="abc", help="which searches to run, e.g. 'a' for autoslim's alone")
    ap.add_argument("--parallel", action="store_true",
                    help="run the searches at the same time, each in its own process with --threads torch threads "
                         "(default 1): every search gets the same wall-clock budget and an equal share of the cores")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per search (default: torch's own; 1 with --parallel)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if not args.arms or set(args.arms) - set("abc"):
            raise UsageError(f"--arms: {args.arms!r}; accepted: letters of 'abc'")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads: {args.threads}; accepted: a whole number >= 1")
        cfg = study_configs(args.data_dir)["a"]
        data = load_data(cfg.data, device=resolve_device(cfg.device))  # checks the files before any search runs
    except UsageError as e:
        print(f"bench_search: {e}", file=sys.stderr)
        return 2
    arms = sorted(set(args.arms))
    threads = args.threads or (1 if args.parallel else None)
    jobs = [(k, dict(budget=args.budget, data_dir=args.data_dir, threads=threads)) for k in arms]
    print(f"{'at once, each' if args.parallel else 'one after the other, each'} with "
          f"{threads or torch.get_num_threads()} torch thread(s) on {os.cpu_count()} cores: {', '.join(arms)}", flush=True)
    results = {}
    with mp.get_context("spawn").Pool(len(jobs)) if args.parallel else contextlib.nullcontext() as pool:
        for k, trials, seconds in (pool.imap_unordered(_run_arm_job, jobs) if pool else map(_run_arm_job, jobs)):
            print(f"({k}) done in {seconds:.0f}s", flush=True)
            results[k] = trials
    results = {k: results[k] for k in arms}

    def points(trials):  # every completed trial counts, feasible or not, so that the three are compared alike
        return [t.values for t in trials if t.state == TrialState.COMPLETE]

    hvs = {k: hypervolume(points(s), DIRECTIONS, REFERENCE) if points(s) else 0.0 for k, s in results.items()}
    logs = {k: log_hypervolume(points(s)) for k, s in results.items()}
    own = "".join(f" ({m}: {cfg.data_for(m).train_subset or 'all'})" for m, c in cfg.methods.items() if c.data)
    print(f"\nMNIST, {len(data.train)} train images{own}, {args.budget:.0f} s per search; hypervolume reference points: "
          f"linear (accuracy 0, {REFERENCE[1]:,.0f} params), log (accuracy {LOG_REFERENCE[0]:.0%}, "
          f"{LOG_REFERENCE[1]:,.0f} params)")
    for k, s in results.items():
        acc, params = best_under(s, args.limit)
        best = f"{100 * acc:.2f}% test with {params:,} params" if params else "none"
        states = {st: sum(t.state == st for t in s) for st in (TrialState.COMPLETE, TrialState.PRUNED)}
        print(f"({k}) {NAMES[k]:<52} trials {states[TrialState.COMPLETE]:>3} complete, "
              f"{states[TrialState.PRUNED]:>3} stopped  hypervolume linear {hvs[k]:.4f} log {logs[k]:.4f}  "
              f"best <= {args.limit:,} params: {best}")
    for k in sorted({"b", "c"} & set(results) if "a" in results else ()):
        print(f"hypervolume ratio (a)/({k}): linear {hvs['a'] / max(hvs[k], 1e-12):.3f}, "
              f"log {logs['a'] / max(logs[k], 1e-12):.3f}  (target >= 1.2)")
    for k, s in results.items():
        print(f"\n({k}) trials: " + ", ".join(trial_summary(t) for t in s if t.duration is not None))
    for k, s in results.items():
        print(f"\n({k}) Pareto front of the completed trials (validation accuracy, params; test accuracy):")
        done = [t for t in s if t.state == TrialState.COMPLETE]
        front = [t for t, keep in zip(done, pareto_mask([t.values for t in done], DIRECTIONS)) if keep] if done else []
        for t in sorted(front, key=lambda t: t.values[1]):
            what = t.user_attrs.get("method", "torch prune")
            knobs = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                             for k, v in t.params.items() if k != "method")
            print(f"    trial {t.number:>3} {what:<11} val {100 * t.values[0]:.2f}%  params {int(t.values[1]):>7,}  "
                  f"test {100 * t.user_attrs['test_accuracy']:.2f}%  {knobs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
