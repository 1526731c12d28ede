"""The user's training loop (autoslim.fit): a fit and an evaluate named in the study file, its refusals,
checkpoints at phase ends, SSS's APG following the user's learning rate; and autoslim inside the user's own
Optuna objective (autoslim.plan: suggest, Plan.compress, objectives; report_rung)."""

import copy
import dataclasses
import math

import optuna
import pytest
import torch
from torch import nn

import autoslim
import user_loops
from autoslim.checkpoint import Checkpointer
from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.fit import ExtraSteps, OptimizerFactory
from autoslim.methods.sss import APG
from autoslim.models import create_model
from autoslim.study import optimize
from autoslim.train import Diverged, evaluate as top1
from autoslim.trial import run_trial
from helpers import one_thread, seed_each_test, tiny_study  # noqa: F401 (autouse fixtures)

TRIMMING = {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100, "rule": "fraction", "fraction": 0.3}


@pytest.fixture(scope="module")
def data():
    return load_data(DataConfig(name="digits", train_subset=300))


def config(method="trimming", params=None, **train) -> TrialConfig:
    return TrialConfig(method=method, params=TRIMMING if params is None else params, model="lenet300_100",
                       train=TrainConfig(epochs=1, batch_size=64, **train))


def test_a_user_fit_trains_every_phase_and_its_records_carry_autoslims_keys(data):
    user_loops.CALLS.clear()
    lines = []
    result = run_trial(config(fit="user_loops:simple_fit"), data=data, callbacks=[autoslim.trial.EpochPrinter(
        lines.append, "t")])
    assert user_loops.CALLS == ["train", "retrain1"]
    assert [(r["epoch"], r["phase"]) for r in result.history] == [(1, "train"), (2, "retrain1")]
    first = result.history[0]
    assert first["train_batches"] == math.ceil(len(data.train) / 64) and isinstance(first["loss"], float)
    assert first["lr"] == 0.05 and first["val_accuracy"] > 0.3
    assert result.params < result.baseline_params and len(lines) == 2


#: Every fit a trial may run: autoslim's loop by default, the same loop named as a user fit, and users' fits with
#: and without the resume extension. The protocol tests run over all of them.
FITS = [None, "autoslim.train:fit", "user_loops:simple_fit", "user_loops:resumable_fit"]
RESUMABLE = [None, "autoslim.train:fit", "user_loops:resumable_fit"]


@pytest.mark.parametrize("fit", FITS)
def test_every_fit_runs_each_phase_through_the_hooks(data, fit):
    """IHT: its masks (on_step_end) hold after every phase, records are numbered across phases, tagged and scored."""
    cfg = config("iht", {"cycles": 2, "sparse_epochs": 1, "dense_epochs": 1}, **({"fit": fit} if fit else {}))
    result = run_trial(cfg, data=data)
    assert [r["phase"] for r in result.history] == ["train", "sparse1", "dense1", "sparse2"]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert all(isinstance(r["loss"], float) and 0 < r["val_accuracy"] <= 1 and r["lr"] > 0 for r in result.history)
    assert result.history[-1]["val_accuracy"] == pytest.approx(top1(result.model, data.val))
    assert result.params < result.baseline_params


@pytest.mark.parametrize("fit", RESUMABLE)
def test_a_resumable_fit_is_checkpointed_every_epoch_and_resumed_mid_phase(data, fit):
    """A fit that takes resume (autoslim's own or a user's) resumes a phase after its last epoch, not from its
    start, and ends with the weights of an uninterrupted run."""
    cfg = dataclasses.replace(config(**({"fit": fit} if fit else {})), train=TrainConfig(
        epochs=2, batch_size=64, **({"fit": fit} if fit else {})))
    saved = []
    torch.manual_seed(0)
    whole = run_trial(cfg, data=data, checkpointer=Checkpointer(save=lambda p: saved.append(copy.deepcopy(p))))
    assert [(len(s["phases"]), s["current"]["loop"]["epoch"]) for s in saved] == [(0, 1), (0, 2), (1, 1)]
    user_loops.CALLS.clear()
    resumed = run_trial(cfg, data=data, checkpointer=Checkpointer(save=lambda p: None, resume=saved[0]))
    if fit == "user_loops:resumable_fit":
        assert user_loops.CALLS == [("train", 1), ("retrain1", None)]  # "train" resumed after its epoch 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3] and resumed.history[0] == whole.history[0]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_fit_that_takes_resume_but_passes_no_state_is_refused_in_one_line(data):
    with pytest.raises(UsageError) as e:
        run_trial(config(fit="user_loops:stateless_resume_fit"), data=data)
    assert str(e.value) == ("train.fit: a fit that takes resume must pass its loop state after every epoch: "
                            "hooks.on_epoch_end(model, record, state=...) (epoch 1 passed none)")


def test_a_user_evaluate_replaces_top1_and_keeps_validation_and_test_apart(data):
    result = run_trial(config(evaluate="user_loops:split_evaluate"), data=data)
    assert {r["val_accuracy"] for r in result.history} == {0.25}
    assert (result.val_accuracy, result.test_accuracy) == (0.25, 0.75)
    assert result.objective("accuracy") == 0.25


@pytest.mark.parametrize("train,message", [
    ({"fit": "user_loops:NOT_CALLABLE"}, "train.fit: expected a callable fit(model, *, epochs, hooks, "
                                         "optimizer_factory), got 3"),
    ({"fit": "user_loops:no_hooks_fit"}, "train.fit: no_hooks_fit must be fit(model, *, epochs, hooks, "
                                         "optimizer_factory, ...); it takes no keyword 'hooks'"),
    ({"fit": "user_loops:nope"}, "train.fit: 'user_loops:nope': module 'user_loops' has no attribute 'nope'"),
    ({"fit": "no_such_pkg:fit"}, "train.fit: 'no_such_pkg:fit': module 'no_such_pkg' not found"),
    ({"evaluate": "user_loops:val_only_evaluate"}, "train.evaluate: val_only_evaluate must be evaluate(model, *, "
                                                   "split) with split 'val' or 'test'"),
])
def test_a_study_refuses_a_bad_fit_or_evaluate_before_writing_anything(tmp_path, train, message):
    raw = tiny_study(train={"epochs": 1, **train}, storage=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(UsageError) as e:
        optimize(StudyConfig.from_dict(raw), log=lambda s: None)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("method,params,train,message", [
    ("trimming", None, {"fit": "user_loops:no_epochs_fit"},
     "train.fit: no_epochs_fit reported 0 epochs of phase 'train' through hooks.on_epoch_end, asked for 1"),
    ("trimming", None, {"fit": "user_loops:returns_model_fit"},
     "train.fit: returns_model_fit returned a LeNet300100; expected None"),
    ("iht", {"cycles": 1, "sparse_epochs": 1}, {"fit": "user_loops:no_step_hook_fit"},
     "train.fit: no_step_hook_fit never called hooks.on_step_end(model, step) in phase 'sparse1'"),
    ("sss", {"level": "channel", "finetune_epochs": 0}, {"fit": "user_loops:own_optimizer_fit"},
     "train.fit: this phase trains extra tensors (APG) at the learning rate of the optimizer built by "
     "optimizer_factory; the fit built none"),
    ("trimming", None, {"evaluate": "user_loops:text_evaluate"},
     "train.evaluate: text_evaluate(split='val') returned 'good'; expected a finite number"),
])
def test_a_fit_or_evaluate_that_breaks_the_protocol_is_refused_in_one_line(data, method, params, train, message):
    cfg = config(method, params, **train)
    with pytest.raises(UsageError) as e:
        run_trial(cfg, data=data)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_user_fit_whose_loss_is_nan_diverges(data):
    with pytest.raises(Diverged, match="training loss is nan at epoch 1"):
        run_trial(config(fit="user_loops:diverging_fit"), data=data)


def test_a_user_fit_is_checkpointed_at_phase_ends_and_a_retry_redoes_only_the_phase_in_progress(data):
    cfg = config(fit="user_loops:simple_fit")
    saved = []
    torch.manual_seed(0)
    whole = run_trial(cfg, data=data, checkpointer=Checkpointer(save=saved.append))
    assert [(len(s["phases"]), s["current"]) for s in saved] == [(1, None), (2, None)]
    user_loops.CALLS.clear()
    resumed = run_trial(cfg, data=data, checkpointer=Checkpointer(save=lambda p: None, resume=saved[0]))
    assert user_loops.CALLS == ["retrain1"]  # "train" replayed from the checkpoint, without training
    assert resumed.history == whole.history[:1] + resumed.history[1:] and len(resumed.history) == 2
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_sss_factors_follow_the_learning_rate_of_the_users_schedule():
    """The APG's eta is its base lr times the ratio the fit's optimizer is at (here a schedule that halved it)."""
    model, factor = nn.Linear(2, 2), nn.Parameter(torch.ones(3))
    factory = OptimizerFactory(list(model.parameters()), config=TrainConfig(lr=0.2), lr_scale=1.0)
    apg = APG([factor], lr=0.2, gamma=0.5)
    steps = ExtraSteps([apg], factory, "fit")
    optimizer = factory()
    optimizer.param_groups[0]["lr"] = 0.1  # what the user's schedule did
    factor.grad = torch.zeros(3)
    steps.on_step_end(model, 0)
    assert apg.param_groups[0]["lr"] == pytest.approx(0.1)
    assert factor.tolist() == pytest.approx([1 - 0.05 - 0.9 * 0.05] * 3)  # APG's first step at eta 0.1
    assert factor.grad is None


# ------------------------------------------------------------------ inside the user's own Optuna objective

def make_fit(data, rung_trial=None):
    def fit(model, *, epochs, hooks, optimizer_factory):
        optimizer = optimizer_factory(cls=torch.optim.SGD, lr=0.05, momentum=0.9)
        for _ in range(epochs):
            loss, _ = user_loops.one_epoch(model, data, hooks, optimizer)
            hooks.on_epoch_end(model, {"loss": loss.item()})
            if rung_trial is not None:
                autoslim.report_rung(rung_trial, epoch=hooks.epochs_done, accuracy=top1(model, data.val),
                                     model=model, min_trials=2, eta=2)
    return fit


def test_suggest_compress_objectives_in_a_users_own_study(data, tmp_path):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))

    def objective(trial):
        plan = autoslim.suggest(trial, methods={"trimming": TRIMMING, "l1l2": {"finetune_epochs": 0, "layers": "all"}})
        small = plan.compress(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10),
                              fit=make_fit(data), evaluate=lambda m: top1(m, data.val),
                              example_inputs=data.val.x, train={"epochs": 1})
        assert small.model(data.val.x[:2]).shape == (2, 10) and math.isnan(small.test_accuracy)
        return autoslim.objectives(trial, small, accuracy=small.val_accuracy,
                                   constraints={"max_params": 10}, artifact_store=store, nothing_removed="keep")

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=2)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        method = t.params["method"]
        assert method in ("trimming", "l1l2") and all(k.startswith(f"{method}.") for k in t.params if k != "method")
        assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["params"]]
        assert t.user_attrs["params"] == t.user_attrs["nonzeros"] and t.user_attrs["history"]
        assert t.constraints == {"max_params": t.user_attrs["params"] - 10}
        files = {m.filename for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
        assert files == {"model.pt", "widths.png", "training.png", "note.md"}


def test_report_rung_stops_a_dominated_trial_inside_a_users_fit(data):
    study = optuna.create_study(directions=["maximize", "minimize"])
    model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10)
    autoslim.report_rung(study.ask(), epoch=1, accuracy=0.99, model=nn.Linear(2, 2), min_trials=2, eta=2)
    trial = study.ask()
    plan = autoslim.Plan(method="trimming", params=autoslim.get_method("trimming").search_space().complete(
        TRIMMING, where="params"))
    with pytest.raises(optuna.TrialPruned, match="stopped at rung 1 epochs"):
        plan.compress(model, fit=make_fit(data, rung_trial=trial), evaluate=lambda m: top1(m, data.val),
                      example_inputs=data.val.x, train={"epochs": 1})
    assert trial.user_attrs["rung_1"][1] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("call,message", [
    (lambda t, d: autoslim.suggest(t, methods=["prune_all"]), "methods: unknown value 'prune_all'"),
    (lambda t, d: autoslim.suggest(t, methods={"trimming": {"rounds": 99}}), "methods.trimming.rounds: 99"),
    (lambda t, d: autoslim.suggest(t, methods=["trimming"]).compress(
        nn.Linear(64, 10), fit=make_fit(d), evaluate=lambda m: 1.0, example_inputs=[1, 2]),
     "example_inputs: expected a batch of inputs (a tensor N x ...), got list"),
    (lambda t, d: autoslim.suggest(t, methods=["trimming"]).compress(
        create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), fit=user_loops.no_hooks_fit,
        evaluate=lambda m: 1.0, example_inputs=d.val.x),
     "fit: no_hooks_fit must be fit(model, *, epochs, hooks, optimizer_factory, ...)"),
    (lambda t, d: autoslim.suggest(t, methods=["l1l2"]).compress(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), fit=make_fit(d), evaluate=lambda m: 1.0,
        example_inputs=d.val.x), "l1l2: Sequential has no removable channel group"),
    (lambda t, d: autoslim.suggest(t, methods=["iht"]).compress(
        create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), fit=make_fit(d), evaluate=lambda m: 1.0,
        example_inputs=d.val.x, pruning={"round_to": 8}), "pruning: method 'iht' does not remove channels"),
    (lambda t, d: autoslim.suggest(t, methods=["trimming"]).compress(
        create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), fit=make_fit(d), evaluate=lambda m: 1.0,
        example_inputs=d.val.x, pruning={"ignore": ["classifier.fc9"]}), "pruning.ignore: 'classifier.fc9' matches"),
])
def test_the_api_refuses_bad_input_in_one_line_before_training(data, call, message):
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    with pytest.raises(UsageError) as e:
        call(trial, data)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_compress_honours_the_pruning_rules(data):
    """plan.compress(pruning=...) keeps ignored layers and rounds widths as a study file's pruning: does."""
    plan = autoslim.Plan(method="trimming", params=autoslim.get_method("trimming").search_space().complete(
        TRIMMING, where="params"))
    small = plan.compress(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), fit=make_fit(data),
                          evaluate=lambda m: top1(m, data.val), example_inputs=data.val.x, train={"epochs": 1},
                          pruning={"ignore": ["classifier.fc1"], "round_to": 8})
    assert small.widths_after["classifier.fc1"] == small.widths_before["classifier.fc1"]
    assert small.widths_after["classifier.fc2"] % 8 == 0
    assert small.widths_after["classifier.fc2"] < small.widths_before["classifier.fc2"]
    assert small.config.pruning.round_to == 8


def test_objectives_prunes_a_result_that_removed_nothing_and_refuses_unknown_objectives(data):
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    plan = autoslim.Plan(method="trimming", params=autoslim.get_method("trimming").search_space().complete(
        TRIMMING, where="params"))
    small = plan.compress(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), fit=make_fit(data),
                          evaluate=lambda m: top1(m, data.val), example_inputs=data.val.x, train={"epochs": 1})
    with pytest.raises(UsageError, match="objectives: unknown objective 'size'; accepted: accuracy, params"):
        autoslim.objectives(trial, small, objectives=["accuracy", "size"])
    assert small.nothing_removed is None and small.params < small.baseline_params
    assert autoslim.objectives(trial, small, objectives=["params", "flops"]) == [small.params,
                                                                                  small.measurements.flops]
    unchanged = dataclasses.replace(small, nothing_removed="removed nothing: trimming left all")
    with pytest.raises(optuna.TrialPruned, match="removed nothing"):
        autoslim.objectives(study.ask(), unchanged)
    assert study.trials[-1].user_attrs["pruned_reason"] == "removed nothing: trimming left all"


def test_a_study_file_with_a_user_fit_and_evaluate_runs_end_to_end(tmp_path):
    raw = tiny_study(train={"epochs": 1, "batch_size": 64, "fit": "user_loops:simple_fit",
                            "evaluate": "user_loops:split_evaluate"}, storage=f"sqlite:///{tmp_path / 's.db'}")
    study = optimize(StudyConfig.from_dict(raw), log=lambda s: None)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.values[0] for t in study.trials} == {0.25}
    assert {t.user_attrs["test_accuracy"] for t in study.trials} == {0.75}
    assert study.trials[0].user_attrs["config"]["train"]["fit"] == "user_loops:simple_fit"
