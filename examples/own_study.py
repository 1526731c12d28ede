"""(b) torchvision's resnet18 compressed inside your own Optuna study, with your own training loop.

Your loop keeps what you need (label smoothing, mixed precision with ``torch.autocast``, a metric of your
own: balanced accuracy here); autoslim samples a compression method and its knobs, runs each of its training
phases through your ``fit``, and stores the result in your trial as its own studies do::

    python examples/own_study.py --data-dir images --n-trials 10

``main`` is what the test suite runs, on a few generated images.
"""

from __future__ import annotations

import argparse

import optuna
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, random_split

import autoslim


def loaders(data_dir: str, *, image_size: int, batch_size: int) -> tuple[DataLoader, DataLoader, int]:
    """Your data: an ImageFolder split 80/20 into training and validation loaders, and its class count."""
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize((image_size, image_size)),
                                         torchvision.transforms.ToTensor()])
    images = torchvision.datasets.ImageFolder(data_dir, transform=tf)
    n_val = max(1, len(images) // 5)
    train, val = random_split(images, [len(images) - n_val, n_val], generator=torch.Generator().manual_seed(0))
    return (DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size),
            len(images.classes))


def make_fit(train_loader: DataLoader):
    """Your training loop, with the hooks autoslim's methods need (autoslim.fit)."""

    def fit(model, *, epochs, hooks, optimizer_factory):
        opt = optimizer_factory()  # the phase's optimizer and learning rate (the methods scale it)
        for _ in range(epochs):
            total, seen = 0.0, 0
            for step, (x, y) in enumerate(train_loader):
                with torch.autocast("cpu", dtype=torch.bfloat16):  # "cuda" on a GPU
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
                loss = loss + hooks.extra_loss(model)  # a method's regularizer (l1/l2)
                opt.zero_grad()
                loss.backward()
                opt.step()
                hooks.on_step_end(model, step)  # IHT's masks, SSS's proximal step, early stopping
                total, seen = total + loss.item() * len(y), seen + len(y)
            hooks.on_epoch_end(model, {"loss": total / seen})

    return fit


def make_evaluate(val_loader: DataLoader, num_classes: int):
    """Your metric, higher is better: balanced accuracy (the mean of the per-class recalls)."""

    @torch.no_grad()
    def evaluate(model) -> float:
        hits, counts = torch.zeros(num_classes), torch.zeros(num_classes)
        for x, y in val_loader:
            pred = model(x).argmax(1)
            counts += torch.bincount(y, minlength=num_classes)
            hits += torch.bincount(y[pred == y], minlength=num_classes)
        return float((hits / counts.clamp_min(1))[counts > 0].mean())

    return evaluate


def main(*, data_dir: str, n_trials: int = 10, epochs: int = 5, image_size: int = 64,
         storage: str | None = None) -> optuna.Study:
    train_loader, val_loader, num_classes = loaders(data_dir, image_size=image_size, batch_size=32)
    fit, evaluate = make_fit(train_loader), make_evaluate(val_loader, num_classes)
    example = next(iter(val_loader))[0]

    def objective(trial: optuna.Trial):
        plan = autoslim.suggest(trial, methods={"trimming": {"rounds": 1}, "l1l2": {}})
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        small = plan.compress(model, fit=fit, evaluate=evaluate, example_inputs=example,
                              train={"epochs": epochs, "lr": 0.05})
        return autoslim.objectives(trial, small)  # [balanced accuracy, parameters]

    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage,
                                study_name="resnet18_own_loop", load_if_exists=True)
    study.optimize(objective, n_trials=n_trials)
    return study


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--storage", default="sqlite:///own_study.db")
    args = parser.parse_args()
    study = main(data_dir=args.data_dir, n_trials=args.n_trials, storage=args.storage)
    for t in study.best_trials:
        print(f"trial {t.number}: {t.params['method']}, balanced accuracy {t.values[0]:.3f}, "
              f"{int(t.values[1]):,} parameters")
