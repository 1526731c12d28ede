"""Streamed data (autoslim.data.StreamSplit): an image folder read through DataLoader workers and torch datasets
handed to streamed_data, used by the training loop, evaluation, the methods and checkpoints like in-memory data."""

import pytest
import torch
from PIL import Image

from autoslim.checkpoint import Checkpointer
from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import StreamSplit, load_data, streamed_data
from autoslim.errors import UsageError
from autoslim.trial import run_trial
from helpers import one_thread, seed_each_test  # noqa: F401 (autouse fixtures)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 24 PNG images of 12x12 pixels: a class colour plus noise."""
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        (root / f"class{c}").mkdir()
        for i in range(24):
            pixels = (torch.tensor(colour).view(1, 1, 3) + 40 * torch.randn(12, 12, 3, generator=gen)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / f"class{c}" / f"{i}.png")
    return root


def config(folder, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", data_dir=str(folder), image_size=8, **{"workers": 0, **kw})


def test_a_streamed_image_folder_has_the_splits_of_the_in_memory_one(folder):
    streamed, memory = load_data(config(folder, stream=True)), load_data(config(folder, stream=False))
    assert streamed.streamed and not memory.streamed
    assert isinstance(streamed.train, StreamSplit) and streamed.in_shape == memory.in_shape == (3, 8, 8)
    for split in ("train", "val", "test"):
        a, b = getattr(streamed, split), getattr(memory, split)
        assert len(a) == len(b) and torch.equal(a.head(len(a)).y, b.y)
    assert streamed.classes == memory.classes == ("class0", "class1", "class2")
    x = streamed.examples(5)
    assert x.shape == (5, 3, 8, 8) and abs(x.mean().item()) < 1.0  # normalised


def test_a_small_folder_loads_into_memory_unless_stream_is_set(folder):
    assert not load_data(config(folder)).streamed


def test_a_trial_trains_evaluates_and_compresses_on_streamed_data_with_workers(folder):
    data = load_data(config(folder, stream=True, workers=1))
    cfg = TrialConfig(method="trimming", model="lenet300_100", data=config(folder, stream=True),
                      params={"rounds": 1, "retrain_epochs": 1, "rule": "fraction", "fraction": 0.3,
                              "apoz_examples": 100}, train=TrainConfig(epochs=2, batch_size=16, lr=0.05))
    result = run_trial(cfg, data=data)
    assert len(result.history) == 3 and result.params < result.baseline_params
    assert result.val_accuracy > 0.5  # three colours: learnable in two epochs
    assert result.measurements.flops > 0 and result.model(data.examples(2)).shape == (2, 3)


def test_a_streamed_epoch_resumes_with_the_same_data_order(folder):
    """The shuffling generator (CPU, a DataLoader's) is checkpointed: a trial resumed after epoch 1 of 2 ends
    with the uninterrupted trial's weights."""
    data = load_data(config(folder, stream=True))
    cfg = TrialConfig(method="iht", model="lenet300_100", data=config(folder, stream=True),
                      params={"cycles": 1, "sparse_epochs": 1}, train=TrainConfig(epochs=2, batch_size=16))
    saved = []
    whole = run_trial(cfg, data=data, checkpointer=Checkpointer(save=saved.append))
    resumed = run_trial(cfg, data=data, checkpointer=Checkpointer(save=lambda p: None, resume=saved[0]))
    assert saved[0]["current"]["loop"]["epoch"] == 1
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_torch_datasets_handed_to_streamed_data_split_as_in_memory_data():
    """A DataLoader stands for its dataset; the splits are disjoint and of the in-memory sizes."""
    cfg = DataConfig(name="synthetic", num_samples=120, image_shape=[1, 6, 6], num_classes=3, workers=0)
    memory = load_data(cfg)
    x = torch.arange(120.0).view(120, 1, 1, 1).expand(120, 1, 6, 6)
    dataset = torch.utils.data.TensorDataset(x, torch.arange(120) % 3)
    data = streamed_data("mine", torch.utils.data.DataLoader(dataset, batch_size=7), config=cfg, num_classes=3,
                         train_subset=50)
    assert (len(data.train), len(data.val), len(data.test)) == (50, len(memory.val), len(memory.test))
    ids = [set(getattr(data, s).head(200).x[:, 0, 0, 0].long().tolist()) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert data.in_shape == (1, 6, 6) and data.classes == ("0", "1", "2")


def test_stream_is_refused_for_a_source_read_into_memory():
    with pytest.raises(UsageError, match="^data.stream: mnist is read into memory; accepted: stream with imagefolder"):
        load_data(DataConfig(name="mnist", stream=True))
