"""Exported models load anywhere and predict as the PyTorch model does; bad exports write nothing."""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState, create_trial

from helpers import spoil_model_file, tiny_study

from autoslim.cli import main
from autoslim.config import DataConfig, TrainConfig, TrialConfig, load_study
from autoslim.errors import UsageError
from autoslim.export import FILES, select_trials
from autoslim.modelfile import load_model, save_model
from autoslim.methods import get_method
from autoslim.models import create_model
from autoslim.trial import load_trial_config, run_trial
from autoslim.study import optimize

TINY = tiny_study(name="tiny", n_trials=1)


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    """A study with trial 0 completed (artifacts uploaded), 1 failed, 2 pruned, 3 still running."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    study = optimize(load_study(folder / "tiny.yaml"), log=lambda s: None)
    study.add_trial(create_trial(state=TrialState.FAIL))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={}))
    with warnings.catch_warnings():  # a storage with heartbeats warns outside Study.optimize
        warnings.simplefilter("ignore", UserWarning)
        study.ask()
    return folder / "tiny.yaml"


@pytest.fixture(scope="module")
def exported(study_file) -> Path:
    out = study_file.parent / "exports"
    assert main(["export", str(study_file), "--trial", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "trial_0").iterdir()) == sorted(FILES)
    return out / "trial_0"


@pytest.fixture(scope="module")
def batch(digits) -> torch.Tensor:
    return digits.val.x[:64].cpu()


def test_onnx_gives_the_pytorch_predictions(exported, batch):
    with torch.no_grad():
        expected = load_model(exported / "model.pt")(batch).numpy()
    session = onnxruntime.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": batch.numpy()})
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_torchscript_loads_without_autoslim(exported, batch, tmp_path):
    torch.save(batch, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "model = torch.jit.load(sys.argv[1])\n"
            "torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n"
            "assert 'autoslim' not in sys.modules, 'autoslim was imported'\n")
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(exported / "model.ts"),
                          str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        expected = load_model(exported / "model.pt")(batch)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_model_file_is_plain_data_and_load_model_is_exact(exported, batch):
    saved = torch.load(exported / "model.pt", weights_only=True)
    assert saved["spec"]["model"] == "lenet300_100" and saved["spec"]["in_shape"] == [1, 8, 8]
    model = load_model(exported / "model.pt")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exported.parent.parent / 'tiny.db'}")
    assert sum(p.numel() for p in model.parameters()) == study.trials[0].user_attrs["params"]
    with torch.no_grad():
        assert torch.equal(model(batch), torch.jit.load(exported / "model.ts")(batch))


@pytest.mark.parametrize("method,params", [("trimming", {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100}),
                                           ("iht", {"cycles": 1, "sparse_epochs": 1, "keep_ratio": 0.2})])
def test_save_and_load_model_round_trip_keeps_sparse_encoding(method, params, digits, batch, tmp_path):
    config = TrialConfig(method=method, params=get_method(method).search_space().complete(params, where=method),
                         model="lenet300_100", data=DataConfig(name="digits"), train=TrainConfig(epochs=1))
    result = run_trial(config, data=digits)
    path = save_model(tmp_path / "model.pt", result.model, config=config, in_shape=digits.in_shape,
                      num_classes=digits.num_classes, sparse=result.sparse)
    saved = torch.load(path, weights_only=True)
    assert saved["sparse"] == (method == "iht")
    assert (saved["state_dict"].get("format") == "autoslim-bitmask-1") == (method == "iht")
    with torch.no_grad():
        assert torch.equal(load_model(path)(batch), result.model.cpu().eval()(batch))


MODEL_FILE_BAD = [
    ("no spec", "spec is missing or not a dict; accepted: a file written by autoslim"),
    ("no architecture", "spec.architecture is missing or not a dict"),
    ("sparse not a bool", "sparse is missing or not a bool"),
    ("unknown model", "spec.model: unknown value 'lenet7'; accepted: "),
    ("params out of range", "spec.method_params.rounds: -7 is out of range; accepted: 1 to 6"),
    ("negative classes", "its network cannot be built: model: 'lenet300_100' failed with model_kwargs {}: "
                         "RuntimeError: Trying to create tensor with negative dimension"),
    ("a layer the model lacks", "its architecture does not fit its model: architecture spec: layer "
                                "'classifier.fc9' (Linear) not found in "),
    ("wrong shapes", "its weights do not fit its architecture: RuntimeError: size mismatch for classifier.fc2.weight"),
    ("pickle payload", "cannot be read: UnpicklingError: it holds objects other than tensors and plain data ("),
]


@pytest.mark.parametrize("spoil,message", MODEL_FILE_BAD, ids=[s for s, _ in MODEL_FILE_BAD])
def test_a_structurally_wrong_model_file_is_one_line_naming_it(tmp_path, spoil, message):
    config = TrialConfig(method="trimming", params=get_method("trimming").search_space().defaults(),
                         model="lenet300_100")
    good = save_model(tmp_path / "model.pt", create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10),
                      config=config, in_shape=(1, 8, 8), num_classes=10)
    spoil_model_file(good, spoil, out=tmp_path / "bad.pt")
    with pytest.raises(UsageError) as e:
        load_model(tmp_path / "bad.pt")
    text = str(e.value)
    assert text.startswith(f"model file: {tmp_path / 'bad.pt'}") and message in text, text
    assert "\n" not in text and "weights_only" not in text and "False" not in text


def test_the_exported_config_says_what_the_model_expects(exported, digits):
    written = yaml.safe_load((exported / "config.yaml").read_text())
    assert written["input"] == digits.input_spec() == torch.load(exported / "model.pt", weights_only=True)["spec"]["input"]


def test_an_input_section_that_is_not_a_mapping_is_refused(exported, tmp_path):
    config = yaml.safe_load((exported / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "input": [1, 8, 8]}))
    with pytest.raises(UsageError, match=r"config.yaml: input must be a mapping \(shape, mean, std, classes\)"):
        load_trial_config(tmp_path / "config.yaml")


def test_train_rebuilds_the_exported_architecture(exported, tmp_path, capsys):
    assert main(["train", str(exported / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    want = sum(p.numel() for p in load_model(exported / "model.pt").parameters())
    got = sum(p.numel() for p in load_model(tmp_path / "again" / "model.pt").parameters())
    assert got == want
    assert f"params {want:,}" in capsys.readouterr().out


def test_export_retrains_a_trial_without_its_artifact(study_file, tmp_path):
    assert main(["export", str(study_file), "--trial", "0", "--retrain", "--out", str(tmp_path)]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_file.parent / 'tiny.db'}")
    model = load_model(tmp_path / "trial_0" / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == study.trials[0].user_attrs["params"]


@pytest.mark.parametrize("trial,message", [(99, "has no trial 99"), (1, "trial 1 is failed"), (2, "trial 2 is pruned"),
                                           (3, "trial 3 is still running")])
def test_export_of_an_unfinished_trial_is_refused(study_file, tmp_path, capsys, trial, message):
    assert main(["export", str(study_file), "--trial", str(trial), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: --trial: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_select_trials_by_front_and_parameter_budget():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "params"])
    for acc, params in [(0.9, 1000), (0.8, 100), (0.7, 500), (0.85, 90)]:
        study.add_trial(create_trial(values=[acc, params], user_attrs={"config": {}}))
    assert [t.number for t in select_trials(study, pareto=True)] == [0, 3]
    assert [t.number for t in select_trials(study, best_under_params=500)] == [3]
    assert [t.number for t in select_trials(study, best_under_params=1000)] == [0]
    with pytest.raises(UsageError, match="no completed trial has at most 50 parameters; the smallest has 90"):
        select_trials(study, best_under_params=50)
