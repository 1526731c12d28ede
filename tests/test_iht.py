"""IHT: exact top-k masks, masks that hold under momentum and weight decay, the phase
schedule (sparse / re-activated / sparse at the end), the sparse encoding, and a trial."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.measure import saved_size
from autoslim.methods import TrialContext, get_method
from autoslim.methods.iht import MaskCallback, magnitude_masks, prunable_layers
from autoslim.sparse import load_sparse_state_dict, sparse_size_bytes, sparse_state_dict
from autoslim.models import create_model
from autoslim.trial import run_trial
from autoslim.train import Callback, train

DATA = DataConfig(name="synthetic")


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


def kept(ratio: float, n: int) -> int:
    return max(1, round(ratio * n))


def zeros(layer: nn.Module) -> int:
    return layer.weight.numel() - int(torch.count_nonzero(layer.weight))


def lenet(in_shape=(1, 8, 8)) -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5", in_shape=in_shape, num_classes=4)


def test_prunable_layers_first_and_last():
    model = lenet()
    assert list(prunable_layers(model)) == ["features.conv1", "features.conv2", "classifier.fc1", "classifier.fc2"]
    assert list(prunable_layers(model, prune_first=False, prune_last=False)) == ["features.conv2", "classifier.fc1"]


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7])
def test_layer_scope_keeps_exact_count_per_layer(ratio):
    layers = prunable_layers(lenet())
    masks = magnitude_masks(layers, keep_ratio=ratio, scope="layer")
    for name, layer in layers.items():
        mask = masks[name]
        assert int(mask.sum()) == kept(ratio, layer.weight.numel()), name
        w = layer.weight.detach().abs()
        assert w[mask].min() >= w[~mask].max()  # the top-k by magnitude


def test_per_layer_ratios_and_global_scope_share_one_threshold():
    layers = prunable_layers(lenet())
    ratios = {n: (0.2 if isinstance(m, nn.Linear) else 0.5) for n, m in layers.items()}
    masks = magnitude_masks(layers, keep_ratio=ratios, scope="global")
    for group_ratio in (0.2, 0.5):
        names = [n for n in layers if ratios[n] == group_ratio]
        total = sum(layers[n].weight.numel() for n in names)
        assert sum(int(masks[n].sum()) for n in names) == kept(group_ratio, total)
        kept_w = torch.cat([layers[n].weight.detach().abs()[masks[n]] for n in names])
        pruned_w = torch.cat([layers[n].weight.detach().abs()[~masks[n]] for n in names])
        assert kept_w.min() >= pruned_w.max()


def test_mask_holds_under_momentum_and_weight_decay(data):
    model = lenet()
    layers = prunable_layers(model)
    masks = magnitude_masks(layers, keep_ratio=0.25)
    callback = MaskCallback(layers, masks)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)
    train(model, data, config=config, callbacks=[callback])  # 42 optimizer steps
    for name, layer in layers.items():
        assert not layer.weight[~masks[name]].any(), name
        assert zeros(layer) == layer.weight.numel() - kept(0.25, layer.weight.numel()), name
    # without the per-step callback the same optimizer regrows pruned weights
    MaskCallback(layers, masks)
    train(model, data, config=TrainConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.9, weight_decay=5e-3))
    assert all(layer.weight[~masks[n]].any() for n, layer in layers.items())


class ZeroCounter(Callback):
    def __init__(self, layers):
        self.layers, self.log = layers, []

    def on_epoch_end(self, model, record):
        self.log.append((record["phase"], {n: zeros(m) for n, m in self.layers.items()}))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_phases_sparse_then_reactivated_then_sparse(data, scope):
    model = lenet()
    params = get_method("iht").search_space().complete(
        {"keep_ratio": 0.3, "linear_keep_factor": 0.5, "scope": scope, "cycles": 2, "sparse_epochs": 1,
         "dense_epochs": 1, "prune_first": False}, where="test")
    layers = prunable_layers(model, prune_first=False)
    ratio = {n: 0.3 * (0.5 if isinstance(m, nn.Linear) else 1.0) for n, m in layers.items()}
    counter = ZeroCounter(prunable_layers(model))
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=1, batch_size=64), callbacks=[counter])
    result = get_method("iht").compress(model, ctx, params)

    assert [phase for phase, _ in counter.log] == ["train", "sparse1", "dense1", "sparse2"]
    for phase, counts in counter.log:
        assert counts["features.conv1"] == 0  # prune_first=False: the input conv stays dense
        if phase.startswith("sparse"):
            if scope == "layer":
                for n, layer in layers.items():
                    assert counts[n] == layer.weight.numel() - kept(ratio[n], layer.weight.numel()), (phase, n)
            else:
                for r in set(ratio.values()):
                    total = sum(layers[n].weight.numel() for n in layers if ratio[n] == r)
                    assert sum(counts[n] for n in layers if ratio[n] == r) == total - kept(r, total), phase
    sparse1, dense1 = counter.log[1][1], counter.log[2][1]
    assert all(dense1[n] < sparse1[n] for n in layers)  # re-activated weights train again
    assert result.sparse and result.model is model
    assert counter.log[-1][1] == {n: zeros(m) for n, m in prunable_layers(model).items()}  # delivered sparse
    assert result.info["kept_weights"] < 0.3 * result.info["prunable_weights"]


def test_sparse_file_smaller_in_proportion(tmp_path):
    ratio = 0.1
    model = lenet(in_shape=(1, 28, 28))  # 431k parameters, 99.9% of them in prunable weights
    layers = prunable_layers(model)
    MaskCallback(layers, magnitude_masks(layers, keep_ratio=ratio))
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    torch.save(sparse_state_dict(model), tmp_path / "sparse.pt")
    dense, sparse = (tmp_path / "dense.pt").stat().st_size, (tmp_path / "sparse.pt").stat().st_size
    # bit mask (1/32 of fp32) + kept values (ratio), plus under 1% of container overhead
    assert ratio * dense < sparse <= (ratio + 1 / 32 + 0.01) * dense
    assert abs(sparse_size_bytes(model) - sparse) < 256  # torch.save records the file name in the archive


def test_load_sparse_state_dict_round_trips_exactly(tmp_path):
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))

    model = net()
    model(torch.randn(4, 3, 8, 8))  # non-trivial BatchNorm running statistics
    layers = prunable_layers(model)
    MaskCallback(layers, magnitude_masks(layers, keep_ratio=0.2))
    torch.save(sparse_state_dict(model), tmp_path / "sparse.pt")
    restored = load_sparse_state_dict(net(), torch.load(tmp_path / "sparse.pt", weights_only=True))
    original, loaded = model.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert original[key].dtype == loaded[key].dtype and torch.equal(original[key], loaded[key]), key


def test_run_trial_end_to_end(data):
    params = get_method("iht").search_space().complete(
        {"keep_ratio": 0.2, "cycles": 2, "sparse_epochs": 1, "dense_epochs": 1}, where="test")
    config = TrialConfig(method="iht", params=params, model="lenet5", data=DATA,
                         train=TrainConfig(epochs=1, batch_size=64))
    result = run_trial(config, data=data)
    attrs = result.user_attrs()
    assert attrs["sparse"] and attrs["nonzeros"] < 0.25 * attrs["params"]
    assert result.params == attrs["nonzeros"]
    assert attrs["size_bytes"] < 0.3 * saved_size(result.model)
    assert [h["phase"] for h in attrs["history"]] == ["train", "sparse1", "dense1", "sparse2"]
    assert set(attrs["widths_after"].values()) == {0.2}
