"""ThriftyNet vs ResNet-20: training throughput on the CPU, parameters and FLOPs, side by side.

The reference ThriftyNet (f=163, T=30, h=5, mb1, tanh, pool every 6; 39,636
parameters) against the project's ResNet-20 (272,474 parameters), both on
3x32x32 inputs with 10 classes, in one process: forward + backward + SGD step
on random batches in train mode, images per second (median of the timed
repeats, after warm-up). FLOPs are torch's count (2 per multiply-accumulate).

Measured (2 shared CPU cores under load, batch 32, 10 timed steps)::

    model                                       params  MFLOPs/img  train img/s
    thriftynet (f=163,T=30,h=5,mb1,pool 6)      39,636       458.9          2.2
    resnet20                                   272,474        81.6         10.0
    ratio thriftynet / resnet20                  0.145       5.622        0.224

ThriftyNet is 6.9x smaller but costs 5.6x the FLOPs and trains ~4.5x slower:
its first six iterations run f^2 = 26,569 MACs per pixel at full 32x32
resolution (methods.md section 5: compute-heavy for its size).

    python benchmarks/bench_thriftynet.py            # batch 32, 3 warm-up + 10 timed steps
    python benchmarks/bench_thriftynet.py --quick    # 1 warm-up + 3 timed steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from autoslim.measure import count_flops, count_params
from autoslim.models import create_model

IN_SHAPE = (3, 32, 32)


def throughput(model: nn.Module, *, batch: int, warmup: int, repeats: int) -> float:
    """Training images per second: forward, backward and an SGD step on one random batch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, *IN_SHAPE), torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    warmup, repeats = (1, 3) if args.quick else (3, 10)
    torch.manual_seed(0)
    models = {
        "thriftynet (f=163,T=30,h=5,mb1,pool 6)": create_model("thriftynet", in_shape=IN_SHAPE, num_classes=10,
                                                               filters=163, iterations=30, history=5,
                                                               pool_every=6, conv="mb1", activation="tanh"),
        "resnet20": create_model("resnet20", in_shape=IN_SHAPE, num_classes=10),
    }
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, "
          f"{warmup} warm-up + {repeats} timed train steps (forward + backward + SGD)")
    rows = {name: (count_params(m), count_flops(m, in_shape=IN_SHAPE),
                   throughput(m, batch=args.batch, warmup=warmup, repeats=repeats)) for name, m in models.items()}
    print(f"{'model':<40} {'params':>9} {'MFLOPs/img':>11} {'train img/s':>12}")
    for name, (params, flops, ips) in rows.items():
        print(f"{name:<40} {params:>9,} {flops / 1e6:>11.1f} {ips:>12.1f}")
    (tp, tf, ti), (rp, rf, ri) = rows.values()
    print(f"{'ratio thriftynet / resnet20':<40} {tp / rp:>9.3f} {tf / rf:>11.3f} {ti / ri:>12.3f}")


if __name__ == "__main__":
    main()
