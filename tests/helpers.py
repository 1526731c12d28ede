"""Small things several test modules share."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoslim.data import batches
from autoslim.train import lr_factor

_TINY = {"data": {"name": "digits", "train_subset": 200}, "model": "lenet300_100",
         "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
         "train": {"epochs": 1, "batch_size": 64}, "n_trials": 2}


def tiny_study(**overrides) -> dict:
    """A study-file dict whose trials take a second or two: digits, LeNet-300-100, one trimming round."""
    return {**copy.deepcopy(_TINY), **overrides}


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Random BatchNorm affine parameters and statistics, so that eval-mode outputs exercise them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


class Payload:
    """Runs code when unpickled (``torch.load(weights_only=True)`` must refuse it)."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def spoil_model_file(path: Path, spoil: str, *, out: Path) -> None:
    """Write to ``out`` the model file ``path`` with one structural fault that ``weights_only=True`` lets through
    (or, ``garbage``/``pickle payload``, one it does not)."""
    if spoil == "garbage":
        out.write_bytes(b"\x00 not a model")
        return
    saved = torch.load(path, weights_only=True)
    spec, state = saved["spec"], saved["state_dict"]
    first = next(iter(spec["architecture"]["layers"]))
    weight = next(k for k in state if k.endswith(".weight") and not k.startswith(first))
    if spoil == "no spec":
        del saved["spec"]
    elif spoil == "no architecture":
        del spec["architecture"]
    elif spoil == "sparse not a bool":
        saved["sparse"] = "no"
    elif spoil == "unknown model":
        spec["model"] = "lenet7"
    elif spoil == "params out of range":
        spec["method_params"]["rounds"] = -7
    elif spoil == "negative classes":
        spec["num_classes"] = -3
    elif spoil == "a layer the model lacks":
        spec["architecture"]["layers"]["classifier.fc9"] = {"type": "Linear", "in_features": 3, "out_features": 3}
    elif spoil == "wrong shapes":
        state[weight] = torch.zeros(state[weight].shape[0], state[weight].shape[1] - 1)
    elif spoil == "pickle payload":
        state[weight] = Payload()
    else:
        raise ValueError(spoil)
    torch.save(saved, out)


@pytest.fixture(autouse=True)
def seed_each_test():
    """Import into a test module to seed every test of it."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module: small convolutions run faster on one thread, and much faster when other
    jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def autoslim_like_fit(model, *, epochs, hooks, optimizer_factory, seed, data, config):
    """A user ``fit`` (import string ``helpers:autoslim_like_fit``) written as a user would, through the hooks,
    doing what autoslim's loop does: same batches, optimizer, schedule and loss, so the same seed gives the same
    weights."""
    optimizer = optimizer_factory()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, epochs))
    generator = torch.Generator(device=data.train.x.device).manual_seed(seed)
    for _ in range(epochs):
        total = 0.0
        for step, (x, y) in enumerate(batches(data.train, batch_size=config.batch_size, shuffle=True,
                                              generator=generator, crop_padding=data.crop_padding, flip=data.flip)):
            loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing) + hooks.extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hooks.on_step_end(model, step)
            total += loss.item() * len(y)
        schedule.step()
        hooks.on_epoch_end(model, {"loss": total / len(data.train)})
