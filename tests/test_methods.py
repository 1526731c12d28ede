"""One test parametrized over the method registry: every method, present and future, is covered."""

import pytest
import torch

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.methods import get_method, list_methods
from autoslim.models import create_model
from autoslim.trial import run_trial

BUDGET_KNOBS = ("epochs", "rounds", "cycles", "iterations")


def smallest_budget(space) -> dict:
    """The method's defaults with every epoch/round/cycle/iteration count at its lower bound."""
    params = space.defaults()
    for name, p in space.params.items():
        if p.type == "int" and any(k in name for k in BUDGET_KNOBS):
            params[name] = int(p.low)
    return params


def for_lenet5(method, params: dict, example: torch.Tensor) -> dict:
    """``params`` with each knob the method's check reads at its first choice that LeNet-5 allows (SSS: level
    channel, LeNet-5 has no residual branch)."""
    model = create_model("lenet5", in_shape=tuple(example.shape[1:]), num_classes=4)
    for knob in method.check_params:
        for choice in method.search_space().params[knob].choices:
            try:
                method.check(model, example_input=example, params={**params, knob: choice})
            except UsageError:
                continue
            params = {**params, knob: choice}
            break
    return params


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(name="synthetic", num_samples=160, image_shape=[1, 12, 12], num_classes=4))


def test_the_registry_wide_tests_cover_a_method_installed_from_outside_the_tree():
    """tests/plugins/toyplugin is on sys.path (tests/conftest.py) with an entry point, as ``pip install`` leaves
    a user's package: every test below runs on its method as on the built-in ones."""
    assert "toy_magnitude" in list_methods() and {"iht", "l1l2", "sss", "thriftynet", "trimming"} <= set(list_methods())


@pytest.mark.parametrize("name", list_methods())
def test_search_space_and_paper_default_are_valid(name):
    space = get_method(name).search_space()
    assert space.method == name and space.params
    assert space.complete(space.paper_default, where="paper_default")


# autoslim's loop, and a user's fit (tests/helpers.py) doing the same work through the hooks (autoslim.fit)
LOOPS = {"autoslim": None, "user_fit": "helpers:autoslim_like_fit"}
_RESULTS: dict = {}


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("name", list_methods())
def test_method_runs_end_to_end_and_really_compresses_or_builds(name, loop, data):
    """Every method, through autoslim's loop and through a user fit: the same seed gives the same compression
    (widths or densities, parameters) and the same epochs with the same validation accuracy."""
    method = get_method(name)
    params = for_lenet5(method, smallest_budget(method.search_space()), data.val.x[:2])
    config = TrialConfig(method=name, params=params, model="lenet5", data=DataConfig(name="synthetic"),
                         train=TrainConfig(epochs=1, batch_size=32, fit=LOOPS[loop]))
    result = run_trial(config, data=data)
    assert 0 <= result.val_accuracy <= 1 and 0 <= result.test_accuracy <= 1
    assert result.model(data.val.x[:2]).shape == (2, 4)
    attrs = result.user_attrs()
    assert attrs["params"] == sum(p.numel() for p in result.model.parameters())
    assert attrs["history"] and attrs["flops"] > 0
    if not method.builds_model:
        assert result.params <= result.baseline_params
    got = (result.widths_after, result.params, [(r["epoch"], r["phase"], r["val_accuracy"]) for r in result.history])
    other = _RESULTS.setdefault(name, got)  # the first loop's result
    assert got == other


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("name", list_methods())
def test_method_runs_on_cuda(name):
    """Data on the GPU, model built on the CPU: the trial moves the model before any method sees it
    (l1l2 and SSS analyse the graph with a data batch before their first epoch)."""
    cuda = torch.device("cuda")
    data = load_data(DataConfig(name="synthetic", num_samples=160, image_shape=[1, 12, 12], num_classes=4), device=cuda)
    method = get_method(name)
    params = for_lenet5(method, smallest_budget(method.search_space()), data.val.x[:2].cpu())
    config = TrialConfig(method=name, params=params, model="lenet5",
                         data=DataConfig(name="synthetic"), train=TrainConfig(epochs=1, batch_size=32), device="cuda")
    result = run_trial(config, data=data)
    assert next(result.model.parameters()).device.type == "cuda"
    assert result.model(data.val.x[:2]).shape == (2, 4)
    assert result.user_attrs()["params"] == sum(p.numel() for p in result.model.parameters())


@pytest.mark.parametrize("name", list_methods())
def test_run_trial_fills_the_parameters_a_config_leaves_out_and_says_so(name, data):
    space = get_method(name).search_space()
    given = {k: v for k, v in smallest_budget(space).items() if any(b in k for b in BUDGET_KNOBS)}
    lenet5 = for_lenet5(get_method(name), {**space.defaults(), **given}, data.val.x[:2])
    given |= {k: v for k, v in lenet5.items() if v != space.defaults()[k]}  # SSS: level channel, not its default
    config = TrialConfig(method=name, params=given, model="lenet5", data=DataConfig(name="synthetic"),
                         train=TrainConfig(epochs=1, batch_size=32))
    lines = []
    result = run_trial(config, data=data, log=lines.append)
    filled = {k: v for k, v in space.defaults().items() if k not in given}
    assert filled and result.info["filled_params"] == filled and result.config.params == {**given, **filled}
    assert lines[0].startswith(f"{name}: parameters not in the config, from its search space: ")
    assert all(f"{k}=" in lines[0] for k in filled)


@pytest.mark.parametrize("params,message", [
    ({"rounds": -7}, "params.rounds: -7 is out of range; accepted: 1 to 6"),
    ({"fraction": 7.5}, "params.fraction: 7.5 is out of range; accepted: 0.05 to 0.3"),
    ({"apoz": 100}, "params.apoz: unknown parameter of 'trimming'; accepted: alpha, apoz_examples, "),
])
def test_run_trial_refuses_a_config_the_study_would_refuse(data, params, message):
    config = TrialConfig(method="trimming", params=params, model="lenet5", data=DataConfig(name="synthetic"))
    with pytest.raises(UsageError) as e:
        run_trial(config, data=data)
    assert str(e.value).startswith(message)
