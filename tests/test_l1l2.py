import copy
import math

import pytest
import torch
from torch import nn

from helpers import randomize_batchnorm

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.methods.l1l2 import EPS, L1L2Penalty, prunable_groups, prune_small_filters, pseudo_norm
from autoslim.models import create_model
from autoslim.trial import run_trial
from autoslim.surgery import remove_channels


def test_filter_pseudo_norm_value_and_gradient_equal_a_hand_computation():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]], dtype=torch.float64, requires_grad=True)
    r = pseudo_norm(w)
    norms = [5.0, 0.0, 10.0]                      # per-filter L2 norms v
    l1, l2 = sum(norms), math.sqrt(sum(n * n for n in norms))
    assert r.item() == pytest.approx(l1 / (l2 + EPS), rel=1e-12)
    r.backward()
    # dR/dv_j = 1/(l2+eps) - l1 * v_j / (l2 (l2+eps)^2), dv_j/dW_j = W_j / v_j (0 for a zero filter)
    rows = [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]
    hand = [[(1 / (l2 + EPS) - l1 * n / (l2 * (l2 + EPS) ** 2)) * x / n if n else 0.0 for x in row]
            for row, n in zip(rows, norms)]
    assert torch.allclose(w.grad, torch.tensor(hand, dtype=torch.float64), rtol=1e-10, atol=1e-14)


def test_kernel_grouping_takes_one_norm_per_input_kernel():
    w = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    w[0, 0, 0] = torch.tensor([3.0, 4.0])          # kernel norms: 5, 0 | 0, 2
    w[1, 1, 0] = torch.tensor([0.0, 2.0])
    assert pseudo_norm(w, grouping="kernel").item() == pytest.approx(7 / (math.sqrt(29) + EPS), rel=1e-12)
    assert pseudo_norm(w).item() == pytest.approx(7 / (math.sqrt(29) + EPS), rel=1e-12)  # one kernel per filter
    w[0, 1, 0] = torch.tensor([0.0, 1.0])          # filter 0 now (5, 1): filter norm sqrt(26)
    assert pseudo_norm(w, grouping="kernel").item() == pytest.approx(8 / (math.sqrt(30) + EPS), rel=1e-12)
    assert pseudo_norm(w).item() == pytest.approx((math.sqrt(26) + 2) / (math.sqrt(30) + EPS), rel=1e-12)


def test_penalty_sums_the_ratio_over_the_regularized_layers_and_is_zero_safe():
    layers = [nn.Conv2d(1, 3, 3), nn.Linear(4, 5)]
    with torch.no_grad():
        layers[1].weight.zero_()  # an all-zero layer: ratio 0, gradient 0 (not NaN)
    loss = L1L2Penalty(layers, strength=0.1).extra_loss(None)
    assert loss.item() == pytest.approx(0.1 * pseudo_norm(layers[0].weight).item())
    loss.backward()
    assert torch.isfinite(layers[0].weight.grad).all() and not layers[1].weight.grad.any()


def test_every_layer_inside_the_network_is_pruned_residual_streams_included():
    x = torch.randn(2, 1, 8, 8)
    lenet = create_model("lenet5", in_shape=(1, 8, 8), num_classes=3)
    assert [g.name for g in prunable_groups(lenet, example_input=x)] == ["features.conv1", "features.conv2",
                                                                         "classifier.fc1"]
    assert len(prunable_groups(lenet, example_input=x, layers="conv")) == 2
    resnet = create_model("resnet20", in_shape=(1, 8, 8), num_classes=3)
    groups = prunable_groups(resnet, example_input=x)
    # the 9 blocks' inner channels and the 3 residual streams, each stream with all the convs that write it
    assert len(groups) == 12 and groups[0].producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert [g.name for g in groups if len(g.producers) == 1] == [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]


def _zero_filters(layer: nn.Module, idx: list[int], bias: float | None = None) -> None:
    with torch.no_grad():
        layer.weight[idx] = 0
        if bias is not None:
            layer.bias[idx] = bias


def test_removal_folds_the_constant_of_zero_filters_with_bias_lenet5():
    torch.manual_seed(0)
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10).eval()
    f = dict(model.named_modules())
    _zero_filters(f["features.conv1"], [1, 4, 7], bias=0.3)      # relu(0.3): a constant 0.3 reaches conv2
    _zero_filters(f["features.conv2"], [0, 9], bias=-0.2)        # relu(-0.2) = 0
    _zero_filters(f["features.conv2"], [5, 6], bias=0.5)
    _zero_filters(f["classifier.fc1"], list(range(0, 500, 3)), bias=0.7)
    x = torch.randn(6, 1, 28, 28)
    before = model(x)
    groups = prunable_groups(model, example_input=x)
    small, removed = prune_small_filters(copy.deepcopy(model), groups, threshold=1e-3, example_input=x)
    assert removed == {"features.conv1": 3, "features.conv2": 4, "classifier.fc1": 167}
    assert torch.allclose(small.eval()(x), before, atol=1e-5)
    # the kept widths give the analytic parameter count of LeNet-5 (28x28: 4x4 maps before fc1)
    c1, c2, f1 = 17, 46, 333
    assert sum(p.numel() for p in small.parameters()) == (25 * c1 + c1) + (25 * c1 * c2 + c2) + (16 * c2 * f1 + f1) + (
        f1 * 10 + 10)


def test_removal_folds_batchnorm_beta_of_zero_filters_vgg11():
    gen = torch.Generator().manual_seed(0)
    model = create_model("vgg11", in_shape=(1, 8, 8), num_classes=4, width=0.25)
    randomize_batchnorm(model, gen)
    model.eval()
    x = torch.randn(5, 1, 8, 8, generator=gen)
    last = prunable_groups(model, example_input=x)[-1]  # its consumer is the linear layer after global pooling
    conv = dict(model.named_modules())[last.producers[0]]
    _zero_filters(conv, list(range(0, last.size, 2)))
    before = model(x)
    small, removed = prune_small_filters(copy.deepcopy(model), [last], threshold=1e-3, example_input=x)
    assert removed == {last.name: last.size // 2}
    assert torch.allclose(small.eval()(x), before, atol=1e-5)
    unfolded = remove_channels(model, {last.name: range(1, last.size, 2)}, example_input=x)
    assert not torch.allclose(unfolded.eval()(x), before, atol=1e-3)  # the removed channels were not zero


def test_l1l2_runs_end_to_end_and_removes_filters():
    data = load_data(DataConfig(name="synthetic", num_samples=160, image_shape=[1, 8, 8], num_classes=4))
    params = {"lambda": 1.0, "threshold": 1e-2, "grouping": "filter", "layers": "all", "finetune_epochs": 1}
    config = TrialConfig(method="l1l2", params=params, model="lenet300_100", data=DataConfig(name="synthetic"),
                         train=TrainConfig(epochs=4, batch_size=8, lr=0.1))
    result = run_trial(config, data=data)
    assert [r["phase"] for r in result.history] == ["sparse"] * 4 + ["finetune"]
    assert result.params == sum(p.numel() for p in result.model.parameters())
    assert result.params < result.baseline_params and sum(result.info["removed"].values()) > 0
