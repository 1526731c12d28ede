"""The network a trial compresses: a base trained once per study and shared, or the user's own weights."""

import dataclasses
from pathlib import Path

import pytest
import torch

from autoslim.basenet import BaseNetworks, base_key, stored_bases
from autoslim.config import BaseConfig, DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.measure import count_params
from autoslim.models import create_model
from autoslim.search.halving import rungs_for
from autoslim.study import optimize
from autoslim.train import evaluate, seed_everything, train
from autoslim.trial import run_trial

from helpers import Payload

TRIMMING = {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}
IHT = {"cycles": 1, "sparse_epochs": 1, "keep_ratio": 0.3}
DATA = DataConfig(name="digits", train_subset=150)
TRAIN = TrainConfig(epochs=2, batch_size=64)


def study(tmp_path: Path, **extra) -> StudyConfig:
    raw = {"name": "b", "data": dataclasses.asdict(DATA), "model": "lenet300_100",
           "methods": {"trimming": TRIMMING, "iht": IHT}, "train": dataclasses.asdict(TRAIN), "n_trials": 2,
           "warm_start": True, "recovery": {"checkpoint": False}}
    raw.update(extra)
    return StudyConfig.from_dict(raw, path=tmp_path / "b.yaml")


def run(cfg: StudyConfig, tmp_path: Path, n_trials: int):
    lines = []
    found = optimize(cfg, n_trials=n_trials, storage=f"sqlite:///{tmp_path / 'b.db'}", log=lines.append)
    return found, lines


def test_the_base_is_trained_once_per_study_and_reused_by_every_trial_and_a_second_worker(tmp_path):
    cfg = study(tmp_path)
    first, lines = run(cfg, tmp_path, 2)
    assert sum("base: training lenet300_100" in line for line in lines) == 1
    ((key, stored),) = stored_bases(first).items()
    assert sorted(t.params["method"] for t in first.trials) == ["iht", "trimming"]
    for t in first.trials:  # neither trial trained the base as a phase of its own
        assert t.user_attrs["info"]["base"]["key"] == key and t.user_attrs["info"]["base"]["source"] == "shared"
        assert "train" not in {r["phase"] for r in t.user_attrs["history"]}
        assert t.user_attrs["config"]["base"] == {"share": True, "train": True, "weights": None, "seed": 0}
    assert [t.user_attrs["info"]["base"]["trained"] for t in first.trials] == [True, False]
    # a second worker (its own Objective, as a second process has) on the same storage and artifact folder
    second, lines = run(cfg, tmp_path, 4)
    assert not any("base: training" in line for line in lines)
    assert any(f"reusing the study's base {key}" in line for line in lines)
    assert all(t.user_attrs["info"]["base"]["artifact_id"] == stored["artifact_id"] for t in second.trials)


def test_an_unreadable_stored_base_is_trained_again_with_one_line(tmp_path):
    cfg = study(tmp_path, methods={"trimming": TRIMMING})
    first, _ = run(cfg, tmp_path, 1)
    (stored,) = stored_bases(first).values()
    (tmp_path / "b-artifacts" / stored["artifact_id"]).write_bytes(b"\x00 not a state dict")
    second, lines = run(cfg, tmp_path, 2)
    assert [line for line in lines if "training it again" in line][0].count("\n") == 0
    assert sum("base: training" in line for line in lines) == 1
    assert second.trials[1].state.name == "COMPLETE"
    (again,) = stored_bases(second).values()
    assert again["artifact_id"] != stored["artifact_id"]


def test_without_an_artifact_store_the_base_is_kept_for_the_run_and_says_so(tmp_path):
    lines = []
    found = optimize(study(tmp_path, n_trials=3), storage="sqlite:///:memory:", log=lines.append)
    assert sum("base: training" in line for line in lines) == 1
    assert any("kept for this study run in this process only" in line for line in lines)
    assert len({t.user_attrs["info"]["base"]["key"] for t in found.trials}) == 1


def trimming_config(base: BaseConfig, seed: int = 0) -> TrialConfig:
    return TrialConfig(method="trimming", params=TRIMMING, model="lenet300_100", data=DATA, train=TRAIN, seed=seed,
                       base=base)


def test_trimming_from_the_shared_base_equals_trimming_after_training_it_in_the_trial():
    torch.set_num_threads(1)
    data = load_data(DATA)
    in_trial = run_trial(trimming_config(BaseConfig(share=False)), data=data)
    shared = run_trial(trimming_config(BaseConfig(seed=0)), data=data)
    assert [r["phase"] for r in in_trial.history] == ["train", "train", "retrain1"]
    assert [r["phase"] for r in shared.history] == ["retrain1"]  # the base trained outside the trial
    assert shared.widths_after == in_trial.widths_after != in_trial.widths_before
    for (name, a), b in zip(in_trial.model.state_dict().items(), shared.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert shared.val_accuracy == in_trial.val_accuracy


def test_a_trials_recorded_config_retrains_its_shared_base_and_reproduces_it(tmp_path):
    torch.set_num_threads(1)
    found, _ = run(study(tmp_path, methods={"trimming": TRIMMING}), tmp_path, 2)
    trial = found.trials[1]  # seed 1; its base was trained with the study's seed, 0
    config = TrialConfig.from_dict(trial.user_attrs["config"])
    assert (config.seed, config.base.seed) == (1, 0)
    again = run_trial(config, data=load_data(config.data))
    assert (again.val_accuracy, again.params) == (trial.user_attrs["val_accuracy"], trial.user_attrs["params"])


def test_the_default_rungs_count_from_the_compression_phases_with_a_shared_base(tmp_path):
    cfg = study(tmp_path, methods={"trimming": TRIMMING, "sss": {"level": "channel"}}, n_trials=1,
                early_stopping={"enabled": True})
    assert rungs_for(cfg, "trimming") == [1, 3, 9]  # the shared base trains outside the trials
    assert rungs_for(cfg, "sss") == rungs_for(cfg, "sss", {"start": "base"}) == [3, 5, 11]  # after its sparse phase
    own = study(tmp_path, methods={"trimming": TRIMMING, "sss": {"level": "channel"}}, base={"share": False})
    assert rungs_for(own, "trimming") == [3, 5, 11] and rungs_for(own, "sss", {"start": "base"}) == [5, 7, 13]
    found, _ = run(study(tmp_path, methods={"trimming": TRIMMING}, n_trials=1, early_stopping={"enabled": True}),
                   tmp_path, 1)
    (trial,) = found.trials  # 1 retrain epoch: rung 1 is reached, at the trial's first epoch
    assert sorted(k for k in trial.user_attrs if k.startswith("rung_")) == ["rung_1"]
    assert len(trial.user_attrs["history"]) == 1


@pytest.mark.parametrize("method", ["l1l2", "sss"])
def test_l1l2_and_sss_start_from_the_base_only_when_asked(method):
    data = load_data(DATA)
    knobs = {"l1l2": {"finetune_epochs": 0}, "sss": {"level": "channel", "finetune_epochs": 0}}[method]
    results = {start: run_trial(TrialConfig(method=method, params={**knobs, "start": start}, model="lenet300_100",
                                            data=DATA, train=TRAIN, base=BaseConfig(seed=0)), data=data)
               for start in ("scratch", "base")}
    assert "base" not in results["scratch"].info
    assert results["base"].info["base"]["source"] == "shared"
    assert [r["phase"] for r in results["base"].history] == ["sparse", "sparse"]
    # a sparse epoch that starts from the trained base is past the first epoch from scratch
    assert results["base"].history[0]["val_accuracy"] > results["scratch"].history[0]["val_accuracy"]


def saved_weights(path: Path, model: str = "lenet300_100", epochs: int = 2) -> torch.nn.Module:
    data = load_data(DATA)
    seed_everything(5)
    net = create_model(model, in_shape=data.in_shape, num_classes=data.num_classes)
    train(net, data, config=dataclasses.replace(TRAIN, epochs=epochs), epochs=epochs, seed=5)
    torch.save(net.state_dict(), path)
    return net


def test_the_users_weights_are_the_base_and_nothing_is_trained(tmp_path):
    torch.set_num_threads(1)
    net = saved_weights(tmp_path / "mine.pt")
    cfg = study(tmp_path, methods={"trimming": TRIMMING}, base={"weights": "mine.pt"})  # relative to the study file
    assert cfg.base.weights == str(tmp_path / "mine.pt")
    found, lines = run(cfg, tmp_path, 1)
    assert not any("base: training" in line for line in lines)
    (trial,) = found.trials
    assert trial.user_attrs["info"]["base"] == {"source": "weights", "weights": str(tmp_path / "mine.pt")}
    config = TrialConfig.from_dict(trial.user_attrs["config"])
    data = load_data(DATA)
    model = create_model("lenet300_100", in_shape=data.in_shape, num_classes=data.num_classes)
    assert BaseNetworks().load_into(model, config, data=data, log=lambda s: None)["source"] == "weights"
    assert evaluate(model, data.val) == evaluate(net, data.val)  # the untouched base is the file's network


@pytest.mark.parametrize("spoil, says", [
    ("missing", "does not exist"),
    ("a tensor", "is not a state dict"),
    ("another model", "does not match"),
    ("pickle payload", "cannot be read"),
])
def test_bad_user_weights_are_refused_in_one_line_before_anything_is_stored(tmp_path, spoil, says, capsys):
    path = tmp_path / "w.pt"
    if spoil == "a tensor":
        torch.save(torch.zeros(3), path)
    elif spoil == "another model":
        torch.save(create_model("lenet5", in_shape=(1, 8, 8), num_classes=10).state_dict(), path)
    elif spoil == "pickle payload":
        torch.save({"w": Payload()}, path)
    cfg = study(tmp_path, methods={"trimming": TRIMMING}, base={"weights": "w.pt"})
    with pytest.raises(UsageError, match=f"^base.weights: {path}.*{says}") as e:
        run(cfg, tmp_path, 1)
    assert "\n" not in str(e.value) and "this ran" not in capsys.readouterr().out
    assert not (tmp_path / "b.db").exists()


def test_weights_and_train_false_together_are_refused(tmp_path):
    with pytest.raises(UsageError, match="^base.train: false"):
        study(tmp_path, base={"weights": "w.pt", "train": False})


def test_the_model_factorys_own_weights_are_used_without_training(tmp_path):
    found, lines = run(study(tmp_path, methods={"trimming": TRIMMING}, base={"train": False}), tmp_path, 1)
    assert not any("base: training" in line for line in lines)
    assert found.trials[0].user_attrs["info"]["base"] == {"source": "model"}
    assert [r["phase"] for r in found.trials[0].user_attrs["history"]] == ["retrain1"]


def test_base_key_depends_on_what_the_base_is_trained_with():
    a = trimming_config(BaseConfig(seed=0))
    assert base_key(a) == base_key(dataclasses.replace(a, method="iht", params={}, seed=9))
    for change in ({"model": "lenet5"}, {"train": dataclasses.replace(TRAIN, lr=0.1)},
                   {"data": dataclasses.replace(DATA, train_subset=100)}, {"base": BaseConfig(seed=1)},
                   {"model_kwargs": {"hidden": [10, 10]}}):
        assert base_key(dataclasses.replace(a, **change)) != base_key(a), change


def test_thriftynets_compression_ratio_is_against_the_studys_model():
    data = load_data(DATA)
    config = TrialConfig(method="thriftynet", params={"budget": 2000, "iterations": 4, "history": 1,
                                                      "pool_every": 2, "conv": "classic", "activation": "relu"},
                         model="lenet5", data=DATA, train=TrainConfig(epochs=1, batch_size=64))
    result = run_trial(config, data=data)
    lenet5 = count_params(create_model("lenet5", in_shape=data.in_shape, num_classes=data.num_classes))
    assert result.baseline_params == lenet5 != result.params
    assert result.user_attrs()["compression"] == lenet5 / result.params > 1
