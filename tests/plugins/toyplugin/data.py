"""Data sources as users write them: tensors or torch datasets, called with what their signature names."""

import torch
from torch.utils.data import TensorDataset


def _blobs(n: int, seed: int, classes: int = 3):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(classes, 1, 8, 8, generator=gen)[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=gen)
    return x, y


def blobs(*, config):
    """Training tensors only (autoslim holds out ``data.test_fraction``); ``config.seed`` makes them."""
    return _blobs(240, config.seed)


def blob_datasets():
    """A (train, test) pair of torch datasets."""
    return TensorDataset(*_blobs(200, 1)), TensorDataset(*_blobs(60, 2))


def wrong():
    return 42
