"""autoslim's trainer against a minimal plain-PyTorch loop, and the in-memory pipeline against DataLoader.

Trains the same LeNet-5 on the same MNIST tensors, same seed, batch size,
optimizer and number of steps, alternating the two several times in one
process, and prints the wall-time ratio (target: at most 1.05). Then times one
epoch of torchvision's per-sample ``DataLoader`` path (``ToTensor`` +
``Normalize``) against autoslim's whole-tensor batching, with the same model
step, and prints the speedup.

    python benchmarks/bench_train.py [--data-dir ../shared/datasets] [--subset 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from autoslim.config import DataConfig, TrainConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.models import create_model
from autoslim.train import evaluate, seed_everything, train


def plain_loop(model, data, *, epochs, batch_size, lr, momentum, weight_decay, seed):
    """What a user writes by hand: shuffle, slice, step, evaluate on validation each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    x, y = data.train.x, data.train.y
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        evaluate(model, data.val)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))
    ap.add_argument("--subset", type=int, default=20000, help="training images (of 51,000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        data = load_data(DataConfig(name="mnist", data_dir=args.data_dir, train_subset=args.subset))
    except UsageError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4)
    fresh = lambda: (seed_everything(0), create_model("lenet5", in_shape=data.in_shape, num_classes=10))[1]  # noqa: E731

    ours, plain = [], []
    for _ in range(args.repeats):
        m = fresh()
        ours.append(timed(lambda: train(m, data, config=cfg, seed=0)))
        acc_ours = evaluate(m, data.test)
        m = fresh()
        plain.append(timed(lambda: plain_loop(m, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=0)))
        acc_plain = evaluate(m, data.test)
    t_ours, t_plain = statistics.median(ours), statistics.median(plain)
    print(f"LeNet-5, MNIST {len(data.train)} train images, {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  autoslim.train     {t_ours:7.2f} s   test acc {100 * acc_ours:.2f}%")
    print(f"  plain PyTorch loop {t_plain:7.2f} s   test acc {100 * acc_plain:.2f}%")
    print(f"  wall-time ratio autoslim/plain = {t_ours / t_plain:.3f}  (target <= 1.05)")

    # One epoch through torchvision's per-sample DataLoader path vs. whole-tensor batches.
    import torchvision
    from torchvision import transforms

    from autoslim.data import _torchvision_root

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = torchvision.datasets.MNIST(root=str(_torchvision_root("mnist", args.data_dir)), train=True, transform=tf)
    ds = torch.utils.data.Subset(ds, range(len(data.train)))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    one = TrainConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr)

    def dataloader_epoch():
        m = fresh()
        opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        for x, y in loader:
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    t_loader = statistics.median(timed(dataloader_epoch) for _ in range(2))
    t_tensor = statistics.median(timed(lambda: train(fresh(), data, config=one)) for _ in range(2))
    print(f"  one epoch, DataLoader(ToTensor, Normalize) {t_loader:7.2f} s vs in-memory tensors {t_tensor:7.2f} s: "
          f"speedup {t_loader / t_tensor:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
