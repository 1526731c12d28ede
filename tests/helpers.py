"""Small things several test modules share."""

import copy

import pytest
import torch
from torch import nn

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
