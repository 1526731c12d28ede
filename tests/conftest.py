import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from autoslim.config import DataConfig
    from autoslim.data import load_data

    return load_data(DataConfig(name="digits"))


@pytest.fixture(scope="session")
def synthetic():
    from autoslim.config import DataConfig
    from autoslim.data import load_data

    return load_data(DataConfig(name="synthetic", num_samples=256, image_shape=[1, 8, 8], num_classes=4))
