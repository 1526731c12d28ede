"""Where in each method's space are the networks of at most 10,000 parameters? A grid, not a search.

Runs a fixed grid of configurations of every method with the data and training
settings of ``studies/search_mnist.yaml`` (20k MNIST training images, LeNet-5
trained 6 epochs before compression) and prints validation and test accuracy,
parameters (non-zeros for IHT), FLOPs and seconds of each. The narrowed ranges
of ``studies/search_mnist.yaml`` were read off its output (run on a lent H100,
10 configurations at a time: 193 s for the grid; on 2 CPU cores a ThriftyNet
row takes 5-20 minutes).

    python benchmarks/explore_search_space.py [--device cuda] [--workers 8] [--data-dir ../shared/datasets]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grid() -> list[tuple[str, dict]]:
    jobs: list[tuple[str, dict]] = []
    for scope in ("layer", "global"):
        for keep in (0.02, 0.03, 0.05):
            for linear in (0.2, 0.4, 1.0):
                jobs.append(("iht", dict(keep_ratio=keep, linear_keep_factor=linear, scope=scope, cycles=2,
                                         sparse_epochs=3, dense_epochs=2)))
    for conv in ("mb1", "classic"):
        for activation in ("tanh", "relu"):
            for budget in (5000, 10000):
                for iterations in (6, 10):
                    for pool_every in (2, 3):
                        jobs.append(("thriftynet", dict(budget=budget, iterations=iterations, history=2,
                                                        pool_every=pool_every, conv=conv, activation=activation)))
    for budget in (6000, 8000):
        for iterations in (8, 12):
            jobs.append(("thriftynet", dict(budget=budget, iterations=iterations, history=2, pool_every=3,
                                            conv="classic", activation="relu")))
    for fraction, rounds in ((0.3, 6), (0.25, 6), (0.3, 5)):
        jobs.append(("trimming", dict(rule="fraction", fraction=fraction, rounds=rounds, layers="all", retrain_epochs=2)))
    for alpha in (0.0, 0.5):
        jobs.append(("trimming", dict(rule="std", alpha=alpha, rounds=6, layers="all", retrain_epochs=2)))
    for gamma in (0.005, 0.01, 0.02, 0.04):
        jobs.append(("sss", dict(gamma=gamma, level="channel", finetune_epochs=2)))
    for lam in (0.01, 0.03, 0.1, 0.3, 1.0):
        jobs.append(("l1l2", {"lambda": lam, "finetune_epochs": 2}))
    return jobs


def run(job: tuple[str, dict, str, str]) -> dict:
    method, params, device, data_dir = job
    import torch

    from autoslim.config import TrialConfig, load_study
    from autoslim.data import load_data
    from autoslim.methods import get_method
    from autoslim.trial import run_trial

    torch.set_num_threads(2)
    cfg = load_study(ROOT / "studies" / "search_mnist.yaml")
    cfg.data.data_dir = data_dir
    data = load_data(cfg.data_for(method), device=torch.device(device))  # as the study trains the method
    full = get_method(method).search_space().complete(params, where=method)
    config = TrialConfig(method=method, params=full, model=cfg.model, data=cfg.data_for(method),
                         train=cfg.train_for(method),
                         seed=cfg.seed, device=device)
    result = run_trial(config, data=data)
    return dict(method=method, knobs=params, val=result.val_accuracy, test=result.test_accuracy,
                params=result.params, flops=result.measurements.flops, seconds=result.seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1, help="configurations run at once (each on 2 threads)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--jsonl", help="also write one JSON line per configuration here")
    args = ap.parse_args()
    jobs = [(m, p, args.device, args.data_dir) for m, p in grid()]
    out = open(args.jsonl, "w") if args.jsonl else None
    start = time.perf_counter()
    print(f"{len(jobs)} configurations on {args.device}, {args.workers} at a time", flush=True)
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(run, jobs):
            knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items())
            print(f"{r['method']:<10} val {100 * r['val']:6.2f}%  test {100 * r['test']:6.2f}%  params {r['params']:>7,}  "
                  f"FLOPs {r['flops']:>11,}  {r['seconds']:5.0f}s  {knobs}", flush=True)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
    print(f"grid done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
