"""ThriftyNet: parameter count = formula, any input size, gradients reach every shortcut
coefficient and BatchNorm, width from a budget, and the method end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.methods import get_method
from autoslim.models import create_model
from autoslim.models.thriftynet import ThriftyNet, thriftynet_params, width_for_budget
from autoslim.trial import run_trial


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("f,T,h,conv,classes", [
    (163, 30, 5, "mb1", 10), (208, 30, 5, "mb1", 10), (16, 4, 1, "mb1", 4), (32, 10, 10, "mb1", 100),
    (163, 30, 5, "classic", 10), (24, 7, 3, "classic", 2),
])
def test_parameter_count_equals_formula(f, T, h, conv, classes):
    model = ThriftyNet(in_shape=(3, 32, 32), num_classes=classes, filters=f, iterations=T, history=h, conv=conv)
    assert n_params(model) == thriftynet_params(f=f, T=T, h=h, conv=conv, num_classes=classes)


def test_reference_configuration_has_39636_parameters():
    assert thriftynet_params(f=163, T=30, h=5, conv="mb1", num_classes=10) == 39_636
    assert n_params(create_model("thriftynet", in_shape=(3, 32, 32), num_classes=10)) == 39_636
    assert thriftynet_params(f=163, T=30, h=5, conv="classic", num_classes=10) == 9 * 163**2 + 2 * 163 * 30 + 180 + 1640


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_output_shape_for_any_input_size(in_shape):
    # pooling every 2 of 12 iterations asks for 6 poolings: those past 1x1 are skipped
    model = ThriftyNet(in_shape=in_shape, num_classes=7, filters=12, iterations=12, history=3, pool_every=2)
    assert model(torch.randn(2, *in_shape)).shape == (2, 7)
    assert model.features(torch.randn(2, *in_shape)).shape[-2:] == (1, 1)


def test_pool_at_pools_after_the_listed_iterations():
    model = ThriftyNet(in_shape=(1, 16, 16), num_classes=3, filters=4, iterations=6, history=2, pool_at=[2, 5])
    assert model.features(torch.randn(1, 1, 16, 16)).shape == (1, 4, 4, 4)
    assert ThriftyNet(in_shape=(1, 16, 16), num_classes=3, filters=4, iterations=30).pool_at == {6, 12, 18, 24, 30}


def test_alpha_initialisation_weights_the_newest_state():
    model = ThriftyNet(in_shape=(1, 8, 8), num_classes=3, filters=4, iterations=5, history=4)
    assert model.alpha[:, 0].eq(0.1).all() and model.alpha[:, 1].eq(0.9).all() and not model.alpha[:, 2:].any()


def test_every_shortcut_coefficient_and_batchnorm_gets_gradient():
    torch.manual_seed(0)
    T, h = 8, 3
    model = ThriftyNet(in_shape=(3, 12, 12), num_classes=5, filters=8, iterations=T, history=h, pool_every=3,
                       activation="relu")
    F.cross_entropy(model(torch.randn(6, 3, 12, 12)), torch.randint(0, 5, (6,))).backward()
    grad = model.alpha.grad
    for t in range(T):  # iteration t+1 sees the states x_t .. x_{t+1-h}: at most t+1 of them
        used = min(t + 1, h)
        assert grad[t, : used + 1].ne(0).all(), t
        assert grad[t, used + 1:].eq(0).all(), t  # states before the input do not exist
    for t, norm in enumerate(model.norms):
        assert norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0, t


@pytest.mark.parametrize("budget,T,h,conv,classes", [
    (40_000, 30, 5, "mb1", 10), (60_000, 30, 5, "mb1", 10), (5_000, 10, 2, "mb1", 4),
    (600_000, 40, 8, "mb1", 100), (40_000, 15, 5, "classic", 10), (3_000, 50, 10, "classic", 2),
])
def test_width_for_budget_is_the_largest_fitting_width(budget, T, h, conv, classes):
    f = width_for_budget(budget, T=T, h=h, conv=conv, num_classes=classes)
    assert thriftynet_params(f=f, T=T, h=h, conv=conv, num_classes=classes) <= budget
    assert thriftynet_params(f=f + 1, T=T, h=h, conv=conv, num_classes=classes) > budget


def test_width_for_budget_reference_and_too_small():
    assert width_for_budget(40_000, T=30, h=5, conv="mb1", num_classes=10) == 163
    with pytest.raises(ValueError):
        width_for_budget(100, T=30, h=5, conv="mb1", num_classes=10)


def test_build_model_from_budget_or_filters():
    method = get_method("thriftynet")
    assert method.builds_model
    full = lambda params: method.search_space().complete(params, where="params")  # noqa: E731 (as a trial's config)
    net = method.build_model(full({"budget": 20_000, "iterations": 12, "history": 2}), in_shape=(1, 28, 28),
                             num_classes=10)
    assert net.filters == width_for_budget(20_000, T=12, h=2, conv="mb1", num_classes=10)
    assert n_params(net) <= 20_000
    net = method.build_model(full({"filters": 40, "budget": 20_000, "conv": "classic"}), in_shape=(3, 32, 32),
                             num_classes=10)
    assert net.filters == 40 and n_params(net) == thriftynet_params(f=40, T=30, h=5, conv="classic", num_classes=10)


def test_run_trial_end_to_end():
    data_config = DataConfig(name="synthetic")
    params = get_method("thriftynet").search_space().complete(
        {"budget": 3_000, "iterations": 10, "history": 2, "pool_every": 3}, where="test")
    config = TrialConfig(method="thriftynet", params=params, model="lenet5", data=data_config,
                         train=TrainConfig(epochs=1, batch_size=64))
    result = run_trial(config, data=load_data(data_config))
    attrs = result.user_attrs()
    assert isinstance(result.model, ThriftyNet)  # the study's model (lenet5) is not trained
    assert attrs["params"] <= 3_000 and "nothing_removed" not in attrs
    lenet5 = sum(p.numel() for p in create_model("lenet5", in_shape=(1, 8, 8), num_classes=4).parameters())
    assert attrs["baseline_params"] == lenet5 and attrs["compression"] == lenet5 / attrs["params"]  # vs the study's
    assert not attrs["sparse"] and len(attrs["history"]) == 1 and attrs["info"]["pool_at"] == [3, 6, 9]
