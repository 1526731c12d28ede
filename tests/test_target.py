"""Size targets (issue 20): a study with a budget samples each trial's size under it, every method removes down to
it by its own importance, and warm starts run the papers' rules capped at the budget."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from helpers import one_thread, tiny_study  # noqa: F401 (autouse fixture)

from autoslim.cli import main
from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.measure import count_flops, count_nonzeros, count_params
from autoslim.methods import TrialContext, get_method
from autoslim.methods.iht import layer_counts, prunable_layers
from autoslim.models import create_model
from autoslim.models.thriftynet import thriftynet_params
from autoslim.search.objective import Objective
from autoslim.search.pareto import is_feasible
from autoslim.selection import SizeTarget
from autoslim.study import optimize
from autoslim.trial import check_trial_config

BUDGET = 5000  # LeNet-5 on digits' 8x8 images has 131,080 parameters
METHODS = ["trimming", "l1l2", "sss", "iht", "thriftynet"]
# Only the epochs are cut (so that the study runs in seconds); every knob that decides size keeps its default range.
FAST = {"trimming": {"retrain_epochs": 1, "apoz_examples": 100}, "l1l2": {"finetune_epochs": 0},
        "sss": {"finetune_epochs": 0}, "iht": {"cycles": 1, "sparse_epochs": 1}, "thriftynet": {"iterations": 6}}


def budget_study(**overrides) -> dict:
    return {"name": "budget", "data": {"name": "digits", "train_subset": 300}, "model": "lenet5", "methods": FAST,
            "train": {"epochs": 1, "batch_size": 64}, "constraints": {"max_params": BUDGET}, "n_trials": 10,
            **overrides}


@pytest.fixture(scope="module")
def budget_only():
    """A study on default spaces that sets only a parameter budget: its trials and the lines it printed."""
    lines: list[str] = []
    torch.set_num_threads(1)
    study = optimize(StudyConfig.from_dict(budget_study()), storage="sqlite:///:memory:", log=lines.append)
    return study, lines


def test_a_budget_only_study_on_default_spaces_is_feasible_warm_starts_included(budget_only):
    study, lines = budget_only
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 9 and all(is_feasible(t) for t in done), [(t.number, t.user_attrs.get("params"),
                                                                    t.user_attrs.get("error")) for t in study.trials]
    warm = [t for t in study.trials if t.user_attrs.get("warm_start")]
    assert sorted(t.params["method"] for t in warm) == sorted(METHODS)
    assert all(t.state == TrialState.COMPLETE for t in warm)
    assert all(t.user_attrs["config"]["target"] == {"measure": "params", "value": BUDGET, "rule": "cap"} for t in warm)
    thrifty = next(t for t in warm if t.params["method"] == "thriftynet")
    assert thrifty.user_attrs["config"]["params"]["budget"] == BUDGET  # the published 40,000, mapped onto the budget
    # SSS's published level: block cannot act on LeNet-5: adapted to channel, in one line, and the searched
    # choices are narrowed to what can act on it, in one line
    sss = next(t for t in warm if t.params["method"] == "sss")
    assert sss.user_attrs["config"]["params"]["level"] == "channel"
    assert [line for line in lines if line.startswith("warm start:")] == [
        "warm start: sss's published level: block is outside what the study searches; it runs level: channel"]
    assert sum(line.startswith("methods.sss.level: 'block', 'both' cannot act on model lenet5") for line in lines) == 1


def test_the_sampled_target_lies_under_the_budget_and_is_recorded(budget_only):
    study, _ = budget_only
    sampled = [t for t in study.trials if not t.user_attrs.get("warm_start") and t.state == TrialState.COMPLETE]
    assert sampled
    for t in sampled:
        method, config = t.params["method"], t.user_attrs["config"]
        assert t.distributions["target_params"] == IntDistribution(low=BUDGET // 20, high=BUDGET, log=True)
        assert config["target"] == {"measure": "params", "value": t.params["target_params"], "rule": "target"}
        knobs = {k.split(".", 1)[1] for k in t.params if k.startswith(f"{method}.")}
        assert knobs and not knobs & set(get_method(method).size_knobs)  # the size knobs are not sampled
        info = t.user_attrs["info"].get("target")
        if info and info["reached"]:
            assert t.user_attrs["params" if not t.user_attrs["sparse"] else "nonzeros"] <= t.params["target_params"]


def test_train_on_an_exported_config_reproduces_the_target(budget_only, tmp_path, capsys):
    study, _ = budget_only
    t = next(t for t in study.trials if not t.user_attrs.get("warm_start") and t.state == TrialState.COMPLETE
             and t.params["method"] in ("trimming", "l1l2", "sss"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(t.user_attrs["config"]))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert f"params {t.user_attrs['params']:,}" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["target"] == t.user_attrs["config"]["target"]


def test_an_older_config_without_a_target_still_reads():
    old = TrialConfig(method="trimming").to_dict()
    del old["target"]
    assert TrialConfig.from_dict(old).target is None


# ------------------------------------------------------------------ each method to a target

def _ctx(target: SizeTarget, **data) -> TrialContext:
    data = load_data(DataConfig(name="synthetic", **data))
    return TrialContext(data=data, train_config=TrainConfig(epochs=0, batch_size=16, lr=0.05), target=target)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune_last", [True, False])
def test_iht_keeps_the_non_zeros_of_the_network_at_its_target_within_one_weight(scope, prune_last):
    """The thresholded weights plus every parameter left dense (biases, a last layer left out) make the target."""
    torch.manual_seed(0)
    ctx = _ctx(SizeTarget(9000), image_shape=[1, 8, 8], num_classes=4)
    model = create_model("lenet5", in_shape=ctx.data.in_shape, num_classes=4)
    params = {**get_method("iht").search_space().defaults(), "cycles": 2, "sparse_epochs": 1, "dense_epochs": 1,
              "scope": scope, "prune_last": prune_last, "keep_ratio": 0.5}
    result = get_method("iht").compress(model, ctx, params)
    assert abs(count_nonzeros(result.model) - 9000) <= 1
    assert result.info["target"]["reached"]
    if scope == "layer":  # one ratio for every thresholded layer, rounded per layer
        density = result.info["density"]
        assert max(density.values()) - min(density.values()) < 0.01, density


def test_iht_layer_counts_add_up_to_the_target_with_one_ratio():
    sizes = {"a": 150, "b": 2400, "c": 48000, "d": 840}
    for keep in (999, 12_345, 51_389):
        counts = layer_counts(sizes, keep)
        assert sum(counts.values()) == keep and all(1 <= counts[n] <= s for n, s in sizes.items())
        assert all(abs(counts[n] - keep * s / sum(sizes.values())) <= 1 for n, s in sizes.items())
    assert layer_counts(sizes, 4) == {"a": 1, "b": 1, "c": 1, "d": 1}  # every layer keeps one


def test_iht_under_a_cap_keeps_its_ratio_where_it_fits():
    torch.manual_seed(0)
    ctx = _ctx(SizeTarget(10**6, cap=True), image_shape=[1, 8, 8], num_classes=4)
    model = create_model("lenet5", in_shape=ctx.data.in_shape, num_classes=4)
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    params = {**get_method("iht").search_space().defaults(), "cycles": 1, "sparse_epochs": 1, "keep_ratio": 0.3}
    result = get_method("iht").compress(model, ctx, params)
    assert abs(result.info["kept_weights"] - 0.3 * total) <= len(layers) and "target" not in result.info


@pytest.mark.parametrize("budget", [1000, 5000, 40_000])
def test_thriftynet_builds_the_widest_network_under_its_target(budget):
    method = get_method("thriftynet")
    params = method.search_space().complete({"iterations": 10, "history": 3}, where="params")
    given = method.with_target(params, SizeTarget(budget))
    size = count_params(method.build_model(given, in_shape=(3, 32, 32), num_classes=10))
    wider = count_params(method.build_model({**given, "filters": method.build_model(
        given, in_shape=(3, 32, 32), num_classes=10).filters + 1}, in_shape=(3, 32, 32), num_classes=10))
    assert size <= budget < wider
    assert method.with_target({**params, "budget": 2000}, SizeTarget(budget, cap=True))["budget"] == min(2000, budget)


def test_a_thriftynet_target_below_its_smallest_network_prunes_the_trial_before_it_trains():
    """T=50 and h=10 need 680 parameters at one filter (10 classes): targets of 300-600 cannot be built. Each
    trial is pruned in one line before any epoch (was: failed on the budget knob's range, and with a range that
    admits it, on the width)."""
    smallest = thriftynet_params(f=1, T=50, h=10, conv="mb1", num_classes=10)
    assert smallest > 600
    lines: list[str] = []
    cfg = budget_study(methods={"thriftynet": {"iterations": 50, "history": 10}}, constraints={"max_params": 600},
                       target={"low": 0.5, "high": 1.0}, n_trials=2, warm_start=False)
    study = optimize(StudyConfig.from_dict(cfg), storage="sqlite:///:memory:", log=lines.append)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for t in study.trials:
        reason = t.user_attrs["pruned_reason"]
        assert reason.startswith(f"thriftynet: a ThriftyNet with T=50, h=10, conv=mb1 does not fit in "
                                 f"{t.params['target_params']} parameters (1 filter needs {smallest})"), reason
        assert f"[trial {t.number}] pruned: {reason}" in lines
    assert not any(" epoch " in line for line in lines)
    with pytest.raises(UsageError, match="does not fit in 500 parameters"):  # `autoslim train` on such a config
        get_method("thriftynet").build_model({**get_method("thriftynet").search_space().defaults(), "budget": 500,
                                              "iterations": 50, "history": 10}, in_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_sss_at_level_block_removes_branches_in_factor_order_to_its_target(measure):
    torch.manual_seed(0)
    model = create_model("resnet20", in_shape=(3, 16, 16), num_classes=4)
    size = count_params if measure == "params" else lambda m: count_flops(m, in_shape=(3, 16, 16))
    full = size(model)
    ctx = _ctx(SizeTarget(int(0.6 * full), measure), image_shape=[3, 16, 16], num_classes=4, num_samples=32)
    params = {**get_method("sss").search_space().defaults(), "level": "block"}
    result = get_method("sss").compress(model, ctx, params)
    info = result.info["target"]
    assert info["reached"] and size(result.model) == info["selected"] <= info["value"] < info["over"]
    assert result.info["blocks"] and not any(result.info["channels"].values())


def test_a_method_that_cannot_reach_a_target_is_refused_in_a_config():
    config = TrialConfig(method="iht", target={"measure": "flops", "value": 10, "rule": "target"})
    config = TrialConfig.from_dict(config.to_dict())
    with pytest.raises(UsageError, match=r"^target: method 'iht' cannot remove down to a flops target; accepted: "
                                         r"target: null, or a method that can \(l1l2, sss, trimming\)"):
        check_trial_config(config)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("target,constraints,message", [
    ({"removal": "target"}, {}, "target.removal: 'target' samples a size under the study's budget, and the study sets "
                                "none; accepted: set constraints.max_params or constraints.max_flops, or removal: "
                                "threshold"),
    ({"removal": "both"}, {"min_accuracy": 0.5}, "target.removal: 'both' samples a size under the study's budget"),
    ({"low": 0.5, "high": 0.2}, {"max_params": 10}, "target.low: 0.5 is above target.high 0.2; accepted: "
                                                    "0 < low <= high <= 1"),
    ({"low": 0}, {"max_params": 10}, "target.low: 0.0 is out of range; accepted: > 0.0 and <= 1.0"),
    ({"high": 2}, {"max_params": 10}, "target.high: 2.0 is out of range; accepted: > 0.0 and <= 1.0"),
    ({"removal": "size"}, {"max_params": 10},
     "target.removal: unknown value 'size'; accepted: target, threshold, both"),
])
def test_bad_target_settings_are_one_line_exit_2(tmp_path, capsys, target, constraints, message):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_study(target=target, constraints=constraints)))
    assert main(["optimize", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoslim: error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_plugin_method_without_target_support_runs_by_its_own_rule_said_in_one_line():
    lines: list[str] = []
    cfg = StudyConfig.from_dict(tiny_study(methods={"toyplugin.method:Magnitude": {"finetune_epochs": 0}},
                                           constraints={"max_params": 50_000}, n_trials=1, warm_start=False))
    study = optimize(cfg, storage="sqlite:///:memory:", log=lines.append)
    (t,) = study.trials
    assert t.state == TrialState.COMPLETE and t.user_attrs["config"]["target"] is None
    assert "toyplugin.method:Magnitude.amount" in t.params and "target_params" not in t.params
    assert lines.count("target: toyplugin.method:Magnitude cannot remove down to a params target; its trials run "
                       "by its own rule (warm start included)") == 1


def test_removal_both_samples_the_rule_per_trial():
    cfg = StudyConfig.from_dict(tiny_study(constraints={"max_params": 30_000}, target={"removal": "both", "low": 0.5},
                                           n_trials=4, warm_start=False))
    study = optimize(cfg, storage="sqlite:///:memory:", log=lambda line: None)
    rules = set()
    for t in study.trials:
        rules.add(t.params["removal"])
        target = t.user_attrs["config"]["target"]
        assert (target is None) == (t.params["removal"] == "threshold")
        assert ("trimming.alpha" in t.params) == (t.params["removal"] == "threshold")  # a size knob
        if target:
            assert 15_000 <= target["value"] == t.params["target_params"] <= 30_000
    assert rules == {"target", "threshold"}


def test_a_size_knob_the_study_file_sets_is_said_to_be_unused_under_a_target():
    lines: list[str] = []
    methods = {"trimming": {**tiny_study()["methods"]["trimming"], "fraction": 0.3}}
    cfg = StudyConfig.from_dict(tiny_study(methods=methods, constraints={"max_params": 30_000}, n_trials=1,
                                           warm_start=False))
    (t,) = optimize(cfg, storage="sqlite:///:memory:", log=lines.append).trials
    assert t.user_attrs["config"]["target"]["rule"] == "target"
    assert lines.count("target: methods.trimming.fraction decide(s) the size under the paper's rule only; with "
                       "removal: target only the warm start uses them") == 1


def test_a_sampled_thriftynet_config_holds_its_target_as_its_budget_before_it_runs():
    """The config a trial stores and prints when it starts (not only the one it ends with) has the knob that is
    the size set to the sampled target."""
    cfg = StudyConfig.from_dict({"methods": ["thriftynet"], "constraints": {"max_params": 5000}})
    objective = Objective(cfg, None, {"thriftynet": get_method("thriftynet").search_space()})
    config = objective.trial_config(optuna.create_study(directions=["maximize", "minimize"]).ask())
    assert config.target.rule == "target" and config.params["budget"] == config.target.value <= 5000
