"""A user's training functions and metrics, named by import string (``user_loops:<name>``) in the tests of
:mod:`autoslim.fit`; some of them break the protocol on purpose."""

import torch
import torch.nn.functional as F

from autoslim.data import batches

CALLS: list[str] = []  # the phases each fit was called for, in order


def one_epoch(model, data, hooks, optimizer, *, step_hooks=True):
    """One epoch of SGD on ``data.train`` through the hooks; the last loss and the number of steps."""
    for step, (x, y) in enumerate(batches(data.train, batch_size=64, shuffle=True)):
        loss = F.cross_entropy(model(x), y) + hooks.extra_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step_hooks:
            hooks.on_step_end(model, step)
    return loss, step + 1


def simple_fit(model, *, epochs, hooks, optimizer_factory, data, phase):
    """Plain SGD through the factory, every hook called."""
    CALLS.append(phase)
    optimizer = optimizer_factory()
    for _ in range(epochs):
        loss, steps = one_epoch(model, data, hooks, optimizer)
        hooks.on_epoch_end(model, {"loss": loss, "train_batches": steps})


def own_optimizer_fit(model, *, epochs, hooks, optimizer_factory, data):
    """Builds its optimizer itself, not through the factory."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        loss, _ = one_epoch(model, data, hooks, optimizer)
        hooks.on_epoch_end(model, {"loss": loss.item()})


def no_step_hook_fit(model, *, epochs, hooks, optimizer_factory, data):
    """Never calls hooks.on_step_end (IHT's masks would not hold)."""
    optimizer = optimizer_factory()
    for _ in range(epochs):
        loss, _ = one_epoch(model, data, hooks, optimizer, step_hooks=False)
        hooks.on_epoch_end(model, {"loss": loss.item()})


def no_epochs_fit(model, *, epochs, hooks, optimizer_factory):
    """Trains nothing and reports nothing."""


def returns_model_fit(model, *, epochs, hooks, optimizer_factory):
    for _ in range(epochs):
        hooks.on_epoch_end(model, {})
    return model


def diverging_fit(model, *, epochs, hooks, optimizer_factory):
    for _ in range(epochs):
        hooks.on_epoch_end(model, {"loss": float("nan")})


def no_hooks_fit(model, *, epochs):
    """Lacks the protocol's keywords."""


def split_evaluate(model, *, split):
    """A user metric that tells the splits apart: 0.25 on validation, 0.75 on test."""
    return {"val": 0.25, "test": 0.75}[split]


def val_only_evaluate(model):
    return 0.5


def text_evaluate(model, *, split):
    return "good"


NOT_CALLABLE = 3


def resumable_fit(model, *, epochs, hooks, optimizer_factory, data, seed, phase, resume):
    """Takes the protocol's resume extension: passes its loop state after every epoch and continues from one."""
    CALLS.append((phase, None if resume is None else resume["epoch"]))
    optimizer = optimizer_factory()
    generator = torch.Generator().manual_seed(seed)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
    for epoch in range(0 if resume is None else resume["epoch"], epochs):
        for step, (x, y) in enumerate(batches(data.train, batch_size=64, shuffle=True, generator=generator)):
            loss = F.cross_entropy(model(x), y) + hooks.extra_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hooks.on_step_end(model, step)
        hooks.on_epoch_end(model, {"loss": loss}, state={"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                                         "generator": generator.get_state()})


def stateless_resume_fit(model, *, epochs, hooks, optimizer_factory, resume):
    """Names resume but never passes its state."""
    for _ in range(epochs):
        hooks.on_epoch_end(model, {"loss": 1.0})


def big_batch_fit(model, *, epochs, hooks, optimizer_factory, data, tell=False):
    """Batches of 128 where the study's train.batch_size says 64; with ``tell``, sets hooks.batches_per_epoch."""
    optimizer = optimizer_factory()
    loader = list(batches(data.train, batch_size=128))
    if tell:
        hooks.batches_per_epoch = len(loader)
    for _ in range(epochs):
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y) + hooks.extra_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hooks.on_step_end(model, step)
        hooks.on_epoch_end(model, {"loss": loss})


def counted_big_batch_fit(model, *, epochs, hooks, optimizer_factory, data):
    """big_batch_fit telling autoslim its steps per epoch."""
    big_batch_fit(model, epochs=epochs, hooks=hooks, optimizer_factory=optimizer_factory, data=data, tell=True)
