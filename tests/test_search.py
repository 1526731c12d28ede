"""The search: conditional space, constraints, Pareto front and hypervolume, early stopping, warm start."""

import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.fit import UserFit
from autoslim.methods import TrialContext, get_method, list_methods
from autoslim.models import create_model
from autoslim.registry import import_object
from autoslim.search.halving import SuccessiveHalving, nondominated_ranks, report_rung, rungs_for, should_stop
from autoslim.search.pareto import box_hypervolume, hypervolume, pareto_front, pareto_mask
from autoslim.space import SearchSpace
from autoslim.study import load_method_data, optimize
from autoslim.train import Callback, evaluate as top1
from autoslim.trial import run_trial

QUIET = dict(log=lambda s: None)


def tiny(**extra) -> StudyConfig:
    raw = {"name": "t", "data": {"name": "digits", "train_subset": 150}, "model": "lenet300_100",
           "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
           "train": {"epochs": 1, "batch_size": 64}, "n_trials": 3, "warm_start": False}
    raw.update(extra)
    return StudyConfig.from_dict(raw)


# ---------------------------------------------------------------- conditional space

def test_conditional_sampling_never_asks_a_method_for_another_methods_parameter():
    spaces = {m: get_method(m).search_space() for m in list_methods()}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        method = trial.suggest_categorical("method", list(spaces))
        values = spaces[method].suggest(trial)
        assert set(values) == set(spaces[method].params)
        assert all(k == "method" or k.startswith(f"{method}.") for k in trial.params)
        seen.add(method)
        study.tell(trial, [0.5, 1.0])
    assert seen == set(spaces)


def test_a_study_file_pins_and_narrows_without_editing_the_space():
    space = SearchSpace.load("trimming").narrow({"rounds": 2, "alpha": {"low": 0.5, "high": 0.6},
                                                 "rule": {"choices": ["std"]}}, where="methods.trimming")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        v = space.suggest(trial)
        assert v["rounds"] == 2 and 0.5 <= v["alpha"] <= 0.6 and v["rule"] == "std"
        assert "trimming.rounds" not in trial.params
        study.tell(trial, 0.0)


def test_a_setting_is_not_sampled_unless_a_study_file_opens_it():
    """``search: false`` (ThriftyNet's filters, trimming's apoz_examples) keeps the default; a range opens it."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    closed = SearchSpace.load("thriftynet")
    opened = closed.narrow({"filters": {"low": 8, "high": 16}}, where="methods.thriftynet")
    for _ in range(10):
        trial = study.ask()
        assert closed.suggest(trial)["filters"] == 0 and "thriftynet.filters" not in trial.params
        assert 8 <= opened.suggest(trial)["filters"] <= 16 and "thriftynet.filters" in trial.params
        study.tell(trial, 0.0)
    searched = {n for n, p in SearchSpace.load("trimming").params.items() if not p.pinned}
    assert "apoz_examples" not in searched and {"rounds", "rule", "fraction"} <= searched


def test_a_setting_with_an_unknown_key_or_a_non_bool_search_is_one_clear_error():
    spec = {"type": "int", "low": 0, "high": 4, "default": 0}
    with pytest.raises(UsageError, match=r"params.k.search: expected true or false"):
        SearchSpace.from_dict({"params": {"k": {**spec, "search": "no"}}}, where="x.yaml")
    with pytest.raises(UsageError, match=r"params.k.hgih: unknown key; accepted: .*search"):
        SearchSpace.from_dict({"params": {"k": {**spec, "hgih": 3}}}, where="x.yaml")


def test_thriftynet_trials_of_a_study_stay_within_the_parameter_budget():
    """The budget decides the width: every trial's network has at most ``budget`` parameters."""
    cfg = tiny(methods={"thriftynet": {"budget": {"low": 2000, "high": 3000}, "iterations": {"low": 4, "high": 6},
                                       "history": {"low": 1, "high": 2}, "pool_every": 2}},
               train={"epochs": 1, "batch_size": 64}, n_trials=3, sampler={"name": "random"})
    study = optimize(cfg, **QUIET)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        assert t.values[1] <= t.params["thriftynet.budget"] and "thriftynet.filters" not in t.params


def test_a_methods_own_train_section_sets_the_training_of_its_trials_only():
    """methods.<name>.train updates the study's train section for that method's trials, and is saved with them."""
    cfg = tiny(methods={"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100},
                        "thriftynet": {"budget": 2000, "iterations": 4, "history": 1, "pool_every": 2,
                                       "train": {"epochs": 3, "lr": 0.02}}},
               n_trials=4, sampler={"name": "random", "seed": 3})
    study = optimize(cfg, **QUIET)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert {t.params["method"] for t in done} == {"trimming", "thriftynet"}
    for t in done:
        train = t.user_attrs["config"]["train"]
        if t.params["method"] == "thriftynet":
            assert (train["epochs"], train["lr"], train["batch_size"]) == (3, 0.02, 64)
            assert [r["epoch"] for r in t.user_attrs["history"]] == [1, 2, 3]
        else:
            assert (train["epochs"], train["lr"]) == (1, 0.05)
            assert [r["epoch"] for r in t.user_attrs["history"]] == [1]  # one retrain epoch: the shared base
            assert t.user_attrs["info"]["base"]["epochs"] == 1  # trained once, outside the trials
    saved = StudyConfig.from_dict(study.user_attrs["autoslim_config"])
    assert saved.train_for("thriftynet") == cfg.train_for("thriftynet") and saved.train_for("trimming") == cfg.train


def test_a_methods_own_data_sets_the_training_images_of_its_trials_only_and_its_saved_config_repeats_them():
    """methods.<name>.data.train_subset: that method trains on more (or fewer) images, validated on the same split;
    a trial rerun from its saved config (what export and `autoslim train` do) trains on the same images."""
    cfg = tiny(methods={"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100,
                                     "data": {"train_subset": 400}},
                        "l1l2": {"finetune_epochs": 1, "layers": "all"}},  # LeNet-300-100 has no conv
               n_trials=2, warm_start=True, nothing_removed="keep")  # one trial of each method, both complete
    assert [len(d.train) for d in load_method_data(cfg).values()] == [400, 150]
    lines: list[str] = []
    study = optimize(cfg, log=lines.append)
    assert "(400 train (l1l2 150) / 216 val / " in lines[0]
    done = {t.params["method"]: t for t in study.trials if t.state == TrialState.COMPLETE}
    assert set(done) == {"trimming", "l1l2"}
    for method, t in done.items():
        config = TrialConfig.from_dict(t.user_attrs["config"])
        assert config.data.train_subset == {"trimming": 400, "l1l2": 150}[method]
        again = run_trial(config, data=load_data(config.data))
        assert [r["loss"] for r in again.user_attrs()["history"]] == [r["loss"] for r in t.user_attrs["history"]]
        assert again.val_accuracy == t.user_attrs["val_accuracy"]
    saved = StudyConfig.from_dict(study.user_attrs["autoslim_config"])
    assert saved.data_for("trimming") == cfg.data_for("trimming") and saved.data_for("l1l2") == cfg.data


# ---------------------------------------------------------------- Pareto front and hypervolume

def test_pareto_front_and_hypervolume_equal_a_hand_computation():
    pts = [[0.90, 40], [0.95, 80], [0.85, 60], [0.70, 10], [0.95, 90]]
    dirs = ["maximize", "minimize"]
    assert pareto_mask(pts, dirs).tolist() == [True, True, False, True, False]
    # front normalised by params 100: (0.9, .4), (0.95, .8), (0.7, .1); area by strips of accuracy:
    hand = 0.70 * (1 - 0.1) + (0.90 - 0.70) * (1 - 0.4) + (0.95 - 0.90) * (1 - 0.8)
    assert hypervolume(pts, dirs, [0.0, 100]) == pytest.approx(hand)
    # a point beyond the reference adds nothing
    assert hypervolume(pts + [[0.99, 150]], dirs, [0.0, 100]) == pytest.approx(hand)


def test_box_hypervolume_equals_a_hand_computation_and_clips_points_outside_the_box():
    box = dict(lower=[0.0, 2.0], upper=[0.05, 5.0])   # error 0-5% by log10 parameters 2-5
    # (0.02, 4) -> (0.4, 2/3); (0.01, 4.5) -> (0.2, 5/6); (0.04, 3) -> (0.8, 1/3): strips along the error axis
    pts = [[0.02, 4.0], [0.01, 4.5], [0.04, 3.0]]
    hand = (0.4 - 0.2) * (1 - 5 / 6) + (0.8 - 0.4) * (1 - 2 / 3) + (1 - 0.8) * (1 - 1 / 3)
    assert box_hypervolume(pts, **box) == pytest.approx(hand)
    # beyond the box in one objective (6% error; 10^5.5 parameters): nothing; on its upper edge: nothing
    assert box_hypervolume(pts + [[0.06, 2.1], [0.001, 5.5], [0.05, 2.0]], **box) == pytest.approx(hand)
    # below the box (50 parameters, log10 1.7): its clipped part, as if at log10 2
    assert box_hypervolume([[0.02, 1.7]], **box) == pytest.approx(box_hypervolume([[0.02, 2.0]], **box)) == 0.6
    assert box_hypervolume([], **box) == 0.0
    with pytest.raises(ValueError, match="upper"):
        box_hypervolume(pts, lower=[0.0, 5.0], upper=[0.05, 2.0])


def test_nondominated_ranks():
    assert nondominated_ranks([(0.9, 10), (0.8, 20), (0.95, 30), (0.7, 40)]).tolist() == [0, 1, 0, 2]


# ---------------------------------------------------------------- constraints

def test_a_constraint_marks_exactly_the_trials_that_break_it():
    study = optimize(tiny(n_trials=4, constraints={"max_params": 30_000}, target={"removal": "threshold"}),
                     storage="sqlite:///:memory:", **QUIET)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    for t in trials:
        assert t.constraints == {"max_params": t.user_attrs["params"] - 30_000}
    front = pareto_front(study)
    assert all(t.user_attrs["params"] <= 30_000 for t in front)
    assert {t.number for t in study.best_trials} == {t.number for t in front}


# ---------------------------------------------------------------- early stopping

def test_should_stop_a_dominated_trial_and_keep_a_non_dominated_one():
    others = [(0.9, 100), (0.85, 100), (0.8, 100), (0.6, 100), (0.5, 100)]
    assert should_stop((0.4, 100), others, eta=3, min_trials=3)        # dominated, worst
    assert not should_stop((0.95, 100), others, eta=3, min_trials=3)   # dominates everyone
    assert not should_stop((0.3, 10), others, eta=3, min_trials=3)     # worst accuracy but smallest
    assert not should_stop((0.4, 100), others[:1], eta=3, min_trials=3)  # too few trials at the rung


@pytest.mark.parametrize("rung", [1, 0.5])
def test_early_stopping_prunes_dominated_trials_in_a_study_and_keeps_partial_results(rung):
    """At a whole rung and at a fractional one (150 images in batches of 64: 3 batches an epoch; rung 0.5 is
    taken after 2 of them, and ranked at the 3rd): a dominated trial outside the best half stops there with its
    partial results, another goes on. Each trial trains its own base (share: false): at the rung they are dense
    nets that differ in accuracy only."""
    cfg = tiny(n_trials=6, train={"epochs": 2, "batch_size": 64}, base={"share": False},
               early_stopping={"enabled": True, "rungs": [rung], "eta": 2, "min_trials": 2})
    study = optimize(cfg, storage="sqlite:///:memory:", **QUIET)
    key, pruned = f"rung_{rung}", study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and len(study.trials) == 6
    for t in pruned:
        assert t.user_attrs["pruned_reason"].startswith(f"stopped at rung {rung} epochs: val ")
        assert len(t.user_attrs["history"]) == int(rung)  # the epochs it finished: none when stopped inside one
        mine = t.user_attrs[key]
        assert [t.user_attrs["val_accuracy"], t.user_attrs["nonzeros"]] == mine
        others = [tuple(o.user_attrs[key]) for o in study.trials if o.number < t.number and key in o.user_attrs]
        assert should_stop(tuple(mine), others, eta=2, min_trials=2)
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert completed and all(len(t.user_attrs["history"]) == 3 for t in completed)  # 2 epochs + 1 retrain
    for t in completed:  # not stopped: too few trials at the rung yet, or not dominated / in the best half
        others = [tuple(o.user_attrs[key]) for o in study.trials if o.number < t.number]
        assert not should_stop(tuple(t.user_attrs[key]), others, eta=2, min_trials=2)


@pytest.mark.parametrize("fit", [None, "user_loops:simple_fit"])
def test_a_fractional_rung_is_taken_after_its_share_of_the_epochs_batches(fit):
    """300 images in batches of 64: 5 batches an epoch. Rung 0.25 after ceil(1.25) = 2 batches, 1.5 after
    ceil(2.5) = 3 batches of the second epoch (step 8), 1 at the end of the first epoch (step 5); each fractional
    point is the validation accuracy of the model at that step."""
    data = load_data(DataConfig(name="digits", train_subset=300))
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    seen = {}

    class Watch(Callback):  # runs after the rung check in each step: notes when each rung key appears
        steps = 0

        def on_step_end(self, model, step):
            self.steps += 1

        def on_batch(self, model, *, epochs_done, batch, batches, evaluate):
            assert batches == 5
            for key in set(trial.user_attrs) - set(seen):
                seen[key] = (self.steps, trial.user_attrs[key][0] == top1(model, data.val))

        def on_epoch_end(self, model, record):
            self.on_batch(model, epochs_done=0, batch=0, batches=5, evaluate=None)

    halving = SuccessiveHalving(trial, rungs=[0.25, 1, 1.5], eta=2, min_trials=100)
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=2, batch_size=64), callbacks=[halving, Watch()],
                       fit=UserFit(import_object(fit, field="fit")) if fit else None)
    torch.manual_seed(0)
    ctx.train(create_model("lenet300_100", in_shape=data.in_shape, num_classes=10))
    assert seen == {"rung_0.25": (2, True), "rung_1": (5, True), "rung_1.5": (8, True)}


def test_a_fit_whose_epoch_ends_before_its_fractional_rung_is_refused_unless_it_sets_its_step_count():
    """300 images: 5 batches of 64 as train.batch_size says, but the fit takes 3 batches of 128. Rung 0.9 would
    come after 5 steps: the epoch ends first (one line), unless the fit sets hooks.batches_per_epoch = 3."""
    data = load_data(DataConfig(name="digits", train_subset=300))
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    fit = UserFit(import_object("user_loops:big_batch_fit", field="fit"))
    model = create_model("lenet300_100", in_shape=data.in_shape, num_classes=10)
    halving = SuccessiveHalving(trial, rungs=[0.9], eta=2, min_trials=100)
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=1, batch_size=64), callbacks=[halving], fit=fit)
    with pytest.raises(UsageError) as e:
        ctx.train(model)
    assert str(e.value) == ("early_stopping.rungs: rung 0.9 lies inside epoch 1, which took 3 step(s) "
                            "(hooks.on_step_end calls) where hooks.batches_per_epoch is 5; a fit whose epochs take "
                            "another number of steps sets hooks.batches_per_epoch")
    fit = UserFit(import_object("user_loops:counted_big_batch_fit", field="fit"))
    halving = SuccessiveHalving(trial, rungs=[0.9], eta=2, min_trials=100)
    TrialContext(data=data, train_config=TrainConfig(epochs=1, batch_size=64), callbacks=[halving], fit=fit).train(model)
    assert "rung_0.9" in trial.user_attrs


def test_report_rung_takes_a_float_epoch_and_a_whole_float_is_the_whole_rung():
    study = optuna.create_study(directions=["maximize", "minimize"])
    report_rung(study.ask(), epoch=1, accuracy=0.9, model=torch.nn.Linear(2, 2), min_trials=2, eta=2)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"^stopped at rung 1 epochs: val 50.00% "):
        report_rung(trial, epoch=1.0, accuracy=0.5, model=torch.nn.Linear(2, 2), min_trials=2, eta=2)
    assert trial.user_attrs["rung_1"] == [0.5, 6]
    trial = study.ask()
    report_rung(trial, epoch=0.5, accuracy=0.5, model=torch.nn.Linear(2, 2), min_trials=2, eta=2)  # alone there
    assert trial.user_attrs["rung_0.5"] == [0.5, 6]


def test_default_rungs_lie_after_the_base_training():
    # base: {share: false}: 2 base epochs in the trial, then one trimming round of 1 retrain epoch: only the default
    # rung epochs + 1 = 3 is reached (with a shared base: tests/test_base.py)
    cfg = tiny(n_trials=1, train={"epochs": 2, "batch_size": 64}, early_stopping={"enabled": True},
               base={"share": False})
    assert cfg.early_stopping.rungs_for(epochs=2) == [3, 5, 11]
    (trial,) = optimize(cfg, storage="sqlite:///:memory:", **QUIET).trials
    assert sorted(k for k in trial.user_attrs if k.startswith("rung_")) == ["rung_3"]


def test_a_trial_whose_training_ends_at_a_rung_completes():
    # 2 base epochs + 1 retrain epoch: the rung is every trial's last epoch, so stopping would save nothing
    cfg = tiny(n_trials=6, train={"epochs": 2, "batch_size": 64}, base={"share": False},
               early_stopping={"enabled": True, "rungs": [3], "eta": 2, "min_trials": 2})
    study = optimize(cfg, storage="sqlite:///:memory:", **QUIET)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    points = [tuple(t.user_attrs["rung_3"]) for t in study.trials]
    assert [list(p) for p in points] == [[t.values[0], t.values[1]] for t in study.trials]  # the finished network
    # at least one of them was dominated at the rung: with one more epoch to go it would have been stopped
    assert any(should_stop(points[i], points[:i], eta=2, min_trials=2) for i in range(len(points)))


def test_thriftynet_trials_are_ranked_a_quarter_into_their_first_epoch_by_default():
    # an architecture has its size from the first step: default rungs 0.25, 1, 3, not after the study's train.epochs
    cfg = tiny(n_trials=5, train={"epochs": 2, "batch_size": 64},
               methods={"thriftynet": {"budget": 2000, "iterations": 4, "history": 1, "pool_every": 2,
                                       "conv": "classic", "activation": "relu"}},
               early_stopping={"enabled": True, "eta": 2, "min_trials": 2})
    assert rungs_for(cfg, "thriftynet") == [0.25, 1, 3]
    study = optimize(cfg, storage="sqlite:///:memory:", **QUIET)
    assert all("rung_0.25" in t.user_attrs for t in study.trials)
    stopped = study.get_trials(states=(TrialState.PRUNED,))
    assert stopped  # one architecture, five seeds: the less accurate ones are dominated early
    for t in stopped:
        key = "rung_0.25" if "rung_1" not in t.user_attrs else "rung_1"
        others = [tuple(o.user_attrs[key]) for o in study.trials if o.number < t.number and key in o.user_attrs]
        assert should_stop(tuple(t.user_attrs[key]), others, eta=2, min_trials=2)
        assert len(t.user_attrs["history"]) == (0 if key == "rung_0.25" else 1)


def test_a_methods_own_rungs_replace_the_studys_for_its_trials():
    cfg = tiny(n_trials=2, train={"epochs": 2, "batch_size": 64},
               methods={"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100,
                                     "early_stopping": {"rungs": [1, 2]}},
                        "l1l2": {"finetune_epochs": 1, "layers": "all"}}, base={"share": False},
               early_stopping={"enabled": True, "rungs": [3]}, warm_start=True)  # one trial of each method
    assert (rungs_for(cfg, "trimming"), rungs_for(cfg, "l1l2")) == ([1, 2], [3])
    study = optimize(cfg, storage="sqlite:///:memory:", **QUIET)
    assert sorted(t.params["method"] for t in study.trials) == ["l1l2", "trimming"]
    for t in study.trials:
        rungs = sorted(k for k in t.user_attrs if k.startswith("rung_"))
        assert rungs == (["rung_1", "rung_2"] if t.params["method"] == "trimming" else ["rung_3"])
    saved = StudyConfig.from_dict(study.user_attrs["autoslim_config"])
    assert rungs_for(saved, "trimming") == [1, 2] and rungs_for(saved, "l1l2") == [3]


@pytest.mark.parametrize("rung,storage", [(1, "two.journal"), (0.5, "two.db")])
def test_early_stopping_with_two_processes_sharing_a_storage(tmp_path, rung, storage):
    """Whole and fractional rungs alike: two processes on one journal file or one SQLite file rank against each
    other's records."""
    study_file = tmp_path / "two.yaml"
    study_file.write_text(yaml.safe_dump({
        "data": {"name": "digits", "train_subset": 150}, "model": "lenet300_100", "warm_start": False,
        "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}},
        "train": {"epochs": 2, "batch_size": 64}, "n_trials": 6, "base": {"share": False},
        "early_stopping": {"enabled": True, "rungs": [rung], "eta": 2, "min_trials": 2}}))
    url = str(tmp_path / storage) if storage.endswith(".journal") else f"sqlite:///{tmp_path / storage}"
    cmd = [sys.executable, "-m", "autoslim", "optimize", str(study_file), "--storage", url, "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from autoslim.storage import get_storage
    study = optuna.load_study(study_name="two", storage=get_storage(url))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6
    key = f"rung_{rung}"
    reached = [t for t in study.trials if key in t.user_attrs]
    assert len(reached) == len(finished)
    stopped = study.get_trials(states=(TrialState.PRUNED,))
    assert stopped  # dense nets at the rung differ only in accuracy: the worse ones are dominated
    for t in stopped:  # each stop is justified by the records in the shared storage
        assert t.user_attrs["pruned_reason"].startswith(f"stopped at rung {rung} epochs")
        others = [tuple(o.user_attrs[key]) for o in reached if o.number != t.number]
        assert should_stop(tuple(t.user_attrs[key]), others, eta=2, min_trials=2)
    assert {len(t.user_attrs["history"]) for t in stopped} == {int(rung)}  # stopped inside the epoch after the rung


# ---------------------------------------------------------------- samplers and warm start

@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_runs_seeded(sampler):
    runs = [optimize(tiny(n_trials=2, sampler={"name": sampler, "seed": 3}), storage="sqlite:///:memory:", **QUIET)
            for _ in range(2)]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


def test_default_tpe_models_each_methods_knobs_jointly():
    """Grouped TPE: each method's knobs are in the relative (jointly modelled) space, not only ``method``."""
    from autoslim.study import make_sampler

    spaces = {m: get_method(m).search_space() for m in ("trimming", "sss")}
    draws = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, method in enumerate(["trimming", "sss", "trimming", "sss"]):
        draws.enqueue_trial({"method": method})
        trial = draws.ask()
        spaces[trial.suggest_categorical("method", list(spaces))].suggest(trial)
        study.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions,
                                                  values=[0.9, 1000.0 + i]))
    knobs = {f"{m}.{k}" for m, space in spaces.items() for k, p in space.params.items() if not p.pinned}
    grouped = make_sampler(tiny()).infer_relative_search_space(study, study.ask())
    ungrouped = tiny(sampler={"name": "tpe", "options": {"multivariate": False}})  # grouping follows it
    plain = make_sampler(ungrouped).infer_relative_search_space(study, study.ask())
    assert set(grouped) == knobs | {"method"}
    assert set(plain) == set()  # Optuna's multi-objective default: every parameter sampled on its own


def test_sampler_options_optuna_refuses_are_one_usage_error():
    from autoslim.study import make_sampler

    with pytest.raises(UsageError, match=r"^sampler\.options: ``group`` option can only be enabled when"):
        make_sampler(tiny(sampler={"name": "tpe", "options": {"multivariate": False, "group": True}}))


def test_paper_defaults_are_enqueued_and_run_first():
    cfg = tiny(n_trials=1, warm_start=True, methods={"trimming": {"apoz_examples": 100, "retrain_epochs": 1}})
    study = optimize(cfg, storage="sqlite:///:memory:", **QUIET)
    first = study.trials[0]
    paper = get_method("trimming").search_space().paper_default
    assert first.user_attrs["warm_start"] == "paper default"
    assert all(first.user_attrs["config"]["params"][k] == v for k, v in paper.items() if k != "retrain_epochs")
    assert first.user_attrs["config"]["params"]["retrain_epochs"] == 1  # the study file's pin wins


def test_a_strict_timeout_stops_a_running_trial_at_its_next_step():
    import time

    from autoslim.search.objective import Deadline

    trial = optuna.create_study().ask()
    later = Deadline(trial, time.time() + 3600)
    later.on_step_end(None, 1)  # before the deadline: goes on
    late = Deadline(trial, time.time() - 1)
    late.on_epoch_end(None, {"epoch": 1})
    with pytest.raises(optuna.TrialPruned, match="strict timeout"):
        late.on_step_end(None, 7)
    assert "step 7, after 1 epoch" in trial.user_attrs["pruned_reason"] and trial.user_attrs["history"] == [{"epoch": 1}]
