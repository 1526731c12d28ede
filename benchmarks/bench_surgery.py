"""Channel removal with autoslim.surgery next to torch-pruning's own pruner.

On torchvision ResNet-18 and MobileNetV2 (10 classes, 3x32x32 inputs) both
tools remove 30% of the channels of every group (the classifier output is
kept): autoslim ranks each group by the L1 norm of its producers' filters and
calls :func:`autoslim.surgery.remove_channels`; torch-pruning runs
``MagnitudePruner`` with L1 importance and ``pruning_ratio=0.3``. Printed side
by side: the wall time of the whole removal (graph analysis included, best of
``--repeats``), the parameters before and after, the reduction, and whether the
pruned model still runs.

    python benchmarks/bench_surgery.py [--repeats 3]

Exits 2 with a hint when torch-pruning is not installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from autoslim.surgery import channel_groups, remove_channels

try:
    import torch_pruning as tp
except ImportError:
    print("torch-pruning is not installed: pip install torch-pruning")
    sys.exit(2)

RATIO = 0.3
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


def with_surgery(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Keep the ``1 - RATIO`` highest-L1 channels of every group."""
    modules = dict(model.named_modules())
    keep = {}
    for g in channel_groups(model, example_input=x):
        score = sum(modules[p].weight.detach().abs().flatten(1).sum(1) for p in g.producers)
        keep[g.name] = torch.argsort(score, descending=True)[: max(1, int(g.size * (1 - RATIO)))]
    return remove_channels(model, keep, example_input=x)


def with_torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module:
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=RATIO, ignored_layers=[classifier])
    pruner.step()
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except RuntimeError:
        return False
    return out.shape == (len(x), 10) and bool(torch.isfinite(out).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = torch.randn(2, 3, 32, 32)
    print(f"{'model':13s} {'tool':14s} {'time s':>7s} {'params before':>14s} {'params after':>13s} "
          f"{'reduction':>9s}  runs")
    for name, build in MODELS.items():
        for tool, prune in (("autoslim", with_surgery), ("torch-pruning", with_torch_pruning)):
            times = []
            for _ in range(args.repeats):
                model = build().eval()
                before = n_params(model)
                start = time.perf_counter()
                pruned = prune(model, x)
                times.append(time.perf_counter() - start)
            after = n_params(pruned)
            print(f"{name:13s} {tool:14s} {min(times):7.3f} {before:14,d} {after:13,d} "
                  f"{1 - after / before:9.1%}  {'yes' if runs(pruned, x) else 'NO'}")


if __name__ == "__main__":
    main()
