import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# A user's package installed outside autoslim's tree (tests/plugins/toyplugin, with its entry points): every
# registry-wide test (tests/test_methods.py) covers its method too.
sys.path.insert(0, str(Path(__file__).parent / "plugins"))


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own empty folder: a study without ``--storage`` writes ``<name>.db`` next to its
    study file or in the working directory, and a database left from an earlier run would be resumed."""
    monkeypatch.chdir(tmp_path)


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
