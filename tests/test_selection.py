"""The selection step every structured method goes through (autoslim.selection): ``pruning.ignore``,
``pruning.round_to``, GroupNorm blocks, and selecting channels globally by importance down to a parameter target
(counted exactly: autoslim.surgery.SizeCount)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from helpers import one_thread, tiny_study  # noqa: F401 (autouse fixture)
from test_structured import (GroupNormCNN, SmallCNN, build, dead_channels, kill, synthetic, trial)

from autoslim import trial as trial_module
from autoslim.config import PruningConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import Split
from autoslim.errors import UsageError
from autoslim.measure import count_flops, count_params
from autoslim.methods import TrialContext, get_method, sss
from autoslim.methods.l1l2 import filter_importance
from autoslim.methods.trimming import apoz, measurable_groups
from autoslim.models import create_model
from autoslim.selection import SizeTarget, rounded, select
from autoslim.study import check_methods, check_study, load_method_data, optimize
from autoslim.surgery import ChannelGroup, SizeCount, channel_groups, remove_channels

STRUCTURED = ["trimming", "l1l2", "sss"]
# Settings under which each method removes the channels a test killed, without training first
# (train.epochs 0): trimming by APoZ (the dead channels are always zero), l1l2 the zero filters, SSS the factors
# that ZeroingAPG sets to 0.
PARAMS = {"trimming": {"rounds": 1, "retrain_epochs": 1, "rule": "fraction", "fraction": 0.3, "layers": "all"},
          "l1l2": {"lambda": 0.3, "threshold": 1e-3, "finetune_epochs": 0},
          "sss": {"level": "channel", "gamma": 0.01, "threshold": 0.0, "finetune_epochs": 0}}


class ZeroingAPG(sss.APG):
    """SSS's optimizer, with every third scaling factor set to 0 as it is made (what a sparse training ends in)."""

    def __init__(self, params, **kw):
        params = list(params)
        with torch.no_grad():
            for p in params:
                p[::3] = 0.0
        super().__init__(params, **kw)


def dead_model(factory):
    """``factory``'s model with a third of every group's channels killed (whole GroupNorm blocks)."""
    def make():
        torch.manual_seed(0)
        model = factory()
        x = torch.randn(2, 3, 8, 8)
        for g in channel_groups(model, example_input=x):
            kill(model, g, dead_channels(g))
        return model
    return make


def run(monkeypatch, factory, method: str, pruning: PruningConfig):
    monkeypatch.setattr(sss, "APG", ZeroingAPG)
    monkeypatch.setattr(trial_module, "build_model", lambda config, **kw: dead_model(factory)())
    config = TrialConfig(method=method, params={**get_method(method).search_space().defaults(), **PARAMS[method]},
                         model="lenet5", train=TrainConfig(epochs=0, batch_size=16, lr=0.1), pruning=pruning)
    return trial_module.run_trial(config, data=synthetic())


# ------------------------------------------------------------------ the rules, hand-checked

def test_round_to_keeps_the_most_important_channels_rounded_up():
    g = ChannelGroup(name="conv", producers=("conv",), size=20)
    scores = {"conv": torch.tensor([float(j % 7) for j in range(20)])}
    rule = {"conv": scores["conv"] < 5}  # removes the 15 channels of importance < 5; keeps 5 (j % 7 in 5, 6)
    assert select([g], scores, PruningConfig(), remove=rule).keep["conv"] == [5, 6, 12, 13, 19]
    kept = select([g], scores, PruningConfig(round_to=8), remove=rule).keep["conv"]
    assert kept == [4, 5, 6, 11, 12, 13, 18, 19]  # + the three most important it removed: importance 4
    assert len(select([g], scores, PruningConfig(round_to=8), remove={"conv": scores["conv"] < 10}).keep["conv"]) == 8
    assert len(select([g], scores, PruningConfig(round_to=8), remove={"conv": scores["conv"] < 1}).keep["conv"]) == 20
    assert [rounded(k, g, PruningConfig(round_to=8)) for k in (0, 1, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 20]


def test_round_to_and_groupnorm_blocks_round_to_their_lcm():
    g = ChannelGroup(name="conv", producers=("conv",), size=24, granularity=6)  # 4 GroupNorm blocks of 6
    scores = {"conv": torch.arange(24.0)}
    rule = {"conv": torch.arange(24) < 18}  # removes 3 blocks, keeps the last one: 6 channels
    assert select([g], scores, PruningConfig(), remove=rule).keep["conv"] == list(range(18, 24))
    kept = select([g], scores, PruningConfig(round_to=4), remove=rule).keep["conv"]  # lcm(4, 6) = 12
    assert kept == list(range(12, 24))
    small = ChannelGroup(name="c", producers=("c",), size=6, granularity=2)
    assert rounded(2, small, PruningConfig(round_to=4)) == 4 and rounded(5, small, PruningConfig(round_to=8)) == 6


def test_a_group_is_ignored_if_any_of_its_producers_is():
    groups = {g.name: g for g in channel_groups(SmallCNN("modules"), example_input=torch.randn(2, 3, 8, 8))}
    scores = {n: torch.arange(float(g.size)) for n, g in groups.items()}
    rule = {n: torch.arange(g.size) < 2 for n, g in groups.items()}
    # the stem and block.conv2 are tied by the residual sum: ignoring block.conv2 keeps the stem's channels too
    keep = select(groups.values(), scores, PruningConfig(ignore=["block.conv2", "fc*"]), remove=rule).keep
    assert sorted(keep) == ["block.conv1", "conv"]
    assert keep["conv"] == list(range(2, 12))


# ------------------------------------------------------------------ every structured method honours both rules

def _group_widths(model: nn.Module) -> dict[str, int]:
    return {g.name: g.size for g in channel_groups(model, example_input=torch.randn(2, 3, 8, 8))}


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("arch", ["cnn", "groupnorm"])
def test_every_method_rounds_the_widths_it_leaves(monkeypatch, method, arch):
    """Widths are the method's own rounded up to a multiple of 4 (8 on the GroupNorm model, whose blocks hold 2
    channels): the same trial without round_to, rounded by hand, never above a group's width."""
    factory = {"cnn": lambda: SmallCNN("modules", num_classes=4), "groupnorm": lambda: GroupNormCNN(num_classes=4)}
    multiple = {"cnn": 4, "groupnorm": 8}[arch]
    base = _group_widths(factory[arch]())
    plain = _group_widths(run(monkeypatch, factory[arch], method, PruningConfig()).model)
    result = run(monkeypatch, factory[arch], method, PruningConfig(round_to=multiple))
    widths = _group_widths(result.model)
    assert any(w % multiple for w in plain.values())  # e.g. the CNN's fc1: 16 -> 10 without rounding, 12 with
    assert widths == {g: min(base[g], math.ceil(w / multiple) * multiple) for g, w in plain.items()}
    assert result.user_attrs()["config"]["pruning"]["round_to"] == multiple


@pytest.mark.parametrize("method", STRUCTURED)
def test_every_method_leaves_ignored_layers_whole(monkeypatch, method):
    factory = lambda: SmallCNN("modules", num_classes=4)  # noqa: E731
    base = _group_widths(factory())
    plain = _group_widths(run(monkeypatch, factory, method, PruningConfig()).model)
    result = run(monkeypatch, factory, method, PruningConfig(ignore=["fc1", "block.conv2"]))
    widths = _group_widths(result.model)
    shrunk = {g for g in base if plain[g] < base[g]}
    assert "fc1" in shrunk  # without the rule every method narrows fc1
    assert widths["fc1"] == base["fc1"] and widths["stem"] == base["stem"]  # the stem is tied to block.conv2
    assert all(widths[g] == plain[g] for g in shrunk - {"fc1", "stem"}) and shrunk - {"fc1", "stem"}


@pytest.mark.parametrize("method", STRUCTURED)
def test_an_ignore_pattern_that_matches_nothing_is_refused_before_training(monkeypatch, method):
    monkeypatch.setattr(trial_module.TrialContext, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(UsageError, match=r"^pruning.ignore: 'clasifier\.\*' matches no layer of SmallCNN; accepted"):
        run(monkeypatch, lambda: SmallCNN("modules"), method, PruningConfig(ignore=["fc1", "clasifier.*"]))
    with pytest.raises(UsageError, match=f"^pruning.ignore: 'fc1', 'conv', 'block', 'stem' leaves {method} nothing"):
        run(monkeypatch, lambda: SmallCNN("modules"), method, PruningConfig(ignore=["fc1", "conv", "block", "stem"]))


def test_pruning_is_refused_for_a_method_that_removes_no_channels():
    with pytest.raises(UsageError, match="^pruning: method 'iht' does not remove channels"):
        trial_module.check_trial_config(TrialConfig(method="iht", pruning=PruningConfig(round_to=8)))
    cfg = StudyConfig.from_dict({"methods": ["iht"], "pruning": {"ignore": ["classifier.*"]}})
    with pytest.raises(UsageError, match=r"^pruning: none of the study's methods \(iht\) removes channels"):
        check_methods(cfg, check_study(cfg), load_method_data(cfg)["iht"])
    for bad, message in [({"round_to": 0}, "pruning.round_to: 0 is out of range"),
                         ({"ignore": "fc1"}, "pruning.ignore: expected a list"),
                         ({"ignore": [""]}, "pruning.ignore: expected module names"),
                         ({"round": 8}, "pruning.round")]:
        with pytest.raises(UsageError, match=f"^{message}"):
            StudyConfig.from_dict({"methods": ["trimming"], "pruning": bad})


def test_a_study_checks_the_ignore_patterns_and_its_trials_record_the_rules():
    cfg = StudyConfig.from_dict({"model": "lenet5", "methods": ["trimming", "iht"],
                                 "pruning": {"ignore": ["features.conv9"], "round_to": 8}})
    with pytest.raises(UsageError, match="^pruning.ignore: 'features.conv9' matches no layer of LeNet5"):
        check_methods(cfg, check_study(cfg), load_method_data(cfg)["trimming"])
    cfg.pruning = PruningConfig(ignore=["classifier.*"], round_to=8)
    check_methods(cfg, check_study(cfg), load_method_data(cfg)["trimming"])
    assert TrialConfig.from_dict(TrialConfig(method="trimming", pruning=cfg.pruning).to_dict()).pruning == cfg.pruning


# ------------------------------------------------------------------ a parameter target

def _importance(model: nn.Module, x: torch.Tensor, criterion: str) -> dict[str, torch.Tensor]:
    """Per-channel importance of every group by a method's criterion: l1l2's relative filter norms, trimming's
    APoZ (lower is more important) where measurable, or random."""
    groups = channel_groups(model, example_input=x)
    if criterion == "filter_norm":
        return {g.name: filter_importance(model, g) for g in groups}
    if criterion == "apoz":
        scores = apoz(model, Split(x, torch.zeros(len(x), dtype=torch.long)),
                      measurable_groups(model, example_input=x))
        return {g: -s for g, s in scores.items()}
    gen = torch.Generator().manual_seed(0)
    return {g.name: torch.rand(g.size, generator=gen) for g in groups}


TARGET_MODELS = {
    "lenet5": lambda: (create_model("lenet5", in_shape=(1, 28, 28), num_classes=10), torch.randn(4, 1, 28, 28)),
    "resnet20": lambda: (create_model("resnet20", in_shape=(3, 16, 16), num_classes=10), torch.randn(4, 3, 16, 16)),
    "groupnorm": lambda: build("groupnorm"),
    "cnn": lambda: build("functional"),
}


@pytest.mark.parametrize("criterion,measure", [("filter_norm", "params"), ("apoz", "params"), ("random", "params"),
                                               ("filter_norm", "flops")])
@pytest.mark.parametrize("arch", list(TARGET_MODELS))
def test_a_target_is_met_within_one_step_and_the_count_is_exact(arch, criterion, measure):
    torch.manual_seed(0)
    model, x = TARGET_MODELS[arch]()
    model.eval()
    counter = SizeCount(model, example_input=x, measure=measure)
    size = count_params if measure == "params" else lambda m: count_flops(m, in_shape=tuple(x.shape[1:]))
    groups = counter.groups
    scores = _importance(model, x, criterion)
    full = size(model)
    for fraction, round_to in [(0.8, 1), (0.5, 1), (0.3, 4), (0.5, 8)]:
        rules = PruningConfig(round_to=round_to)
        floor = select(groups, scores, rules, counter=counter, **{f"target_{measure}": 0})  # each group at one unit
        assert not floor.reached and floor.size == size(remove_channels(model, floor.keep, example_input=x))
        target = int(floor.size + fraction * (full - floor.size))
        sel = select(groups, scores, rules, counter=counter, **{f"target_{measure}": target})
        assert sel.reached
        small = remove_channels(model, sel.keep, example_input=x)
        assert size(small) == sel.size <= target < sel.over, (fraction, round_to)
        units = {g.name: math.lcm(round_to, g.granularity) for g in groups}
        sizes = {g.name: g.size for g in groups}
        assert all(len(k) == sizes[n] or len(k) % units[n] == 0 for n, k in sel.keep.items())
        # within one step: putting back the last one (one unit of one group, or the part of a group above its
        # largest multiple) gives a network over the target
        name, channels = sel.last
        assert len(channels) == units[name] or len(channels) == sizes[name] - sizes[name] // units[name] * units[name]
        back = {**sel.keep, name: sorted(sel.keep[name] + channels)}
        assert size(remove_channels(model, back, example_input=x)) == sel.over


def test_a_target_removes_the_least_important_channels_first_and_reports_an_unreachable_one():
    model, x = TARGET_MODELS["lenet5"]()
    counter = SizeCount(model, example_input=x)
    scores = {g.name: torch.arange(float(g.size)) for g in counter.groups}
    scores["features.conv2"] += 1000.0  # conv2's channels all rank above the others
    sel = select(counter.groups, scores, PruningConfig(), target_params=count_params(model) - 10_000,
                 counter=counter)
    assert len(sel.keep["features.conv2"]) == 50 and sel.keep["classifier.fc1"][0] > 0
    assert sel.keep["classifier.fc1"] == list(range(500 - len(sel.keep["classifier.fc1"]), 500))
    assert select(counter.groups, scores, PruningConfig(), target_params=10**9, counter=counter).over is None
    floor = select(counter.groups, scores, PruningConfig(), target_params=10, counter=counter)
    assert not floor.reached and all(len(k) == 1 for k in floor.keep.values())
    assert count_params(remove_channels(model, floor.keep, example_input=x)) == floor.size > 10


@pytest.mark.parametrize("measure", ["params", "flops"])
@pytest.mark.parametrize("arch", ["functional", "groupnorm", "channel_last", "tv_mobilenet_v2"])
def test_the_count_of_any_keep_equals_the_removed_models(arch, measure):
    model, x = build(arch)
    counter = SizeCount(model, example_input=x, measure=measure)
    size = count_params if measure == "params" else lambda m: count_flops(m, in_shape=tuple(x.shape[1:]))
    rnd = random.Random(0)
    for _ in range(3):
        keep = {}
        for g in counter.groups:
            blocks = sorted(rnd.sample(range(g.size // g.granularity), rnd.randint(1, g.size // g.granularity)))
            keep[g.name] = [b * g.granularity + i for b in blocks for i in range(g.granularity)]
        assert counter.count(keep) == size(remove_channels(model, keep, example_input=x))


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("arch,round_to,measure", [("cnn", 1, "params"), ("cnn", 4, "params"), ("cnn", 1, "flops"),
                                                   ("groupnorm", 1, "params"), ("groupnorm", 4, "flops")])
def test_a_method_given_a_target_lands_within_one_step_of_it(method, arch, round_to, measure):
    """Each method removes channels by its own importance (APoZ, relative filter norm, |factor|) down to the target:
    the count it predicts fits, the step it stopped after would not; the removed model has that count (l1l2 and
    SSS may add a bias where a removed channel's constant is folded into a consumer that had none)."""
    model = {"cnn": lambda: SmallCNN("modules", num_classes=4),
             "groupnorm": lambda: GroupNormCNN(num_classes=4)}[arch]()
    size = count_params if measure == "params" else lambda m: count_flops(m, in_shape=(3, 8, 8))
    full = size(model)
    target = int(0.75 * full)
    params = {**get_method(method).search_space().defaults(), **PARAMS[method], "rounds": 2}
    params = {k: v for k, v in params.items() if k in get_method(method).search_space().params}
    ctx = TrialContext(data=synthetic(), train_config=TrainConfig(epochs=0, batch_size=16, lr=0.1),
                       target=SizeTarget(target, measure), pruning=PruningConfig(round_to=round_to))
    result = get_method(method).compress(model, ctx, params)
    info = result.info["target"]
    achieved = size(result.model)
    # a channel the target needs whose constant a zero-padded conv reads is folded all the same (border: auto)
    assert not any(result.info.get("kept_padded", {}).values())
    assert info["reached"] and info["selected"] <= target < info["over"], info
    assert info["selected"] <= achieved < info["over"] and achieved < full
    assert all(w % round_to == 0 for w in _group_widths(result.model).values())  # every full width is a multiple


def test_a_studys_trials_honour_and_record_its_pruning_rules():
    methods = {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100, "rule": "fraction",
                            "fraction": 0.3, "layers": "all"}}
    cfg = StudyConfig.from_dict(tiny_study(methods=methods, n_trials=1, warm_start=False,
                                           pruning={"ignore": ["classifier.fc2"], "round_to": 8}))
    study = optimize(cfg, storage="sqlite:///:memory:", log=lambda line: None)
    (t,) = study.trials
    assert t.user_attrs["config"]["pruning"] == {"ignore": ["classifier.fc2"], "round_to": 8}
    before, after = t.user_attrs["widths_before"], t.user_attrs["widths_after"]
    assert after["classifier.fc2"] == before["classifier.fc2"] == 100  # ignored
    assert after["classifier.fc1"] == 216  # 300 - int(0.3 * 300) = 210, rounded up to a multiple of 8
