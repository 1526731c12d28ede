"""The user's model, data and method from their own package (tests/plugins/toyplugin): by import string and by
entry point, from a study file through optimize, show, report, export, export --retrain and train."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import torchvision
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import one_thread, seed_each_test  # noqa: F401  (fixtures)
from toyplugin.data import blob_datasets
from toyplugin.method import Magnitude
from toyplugin.nets import make_net

from autoslim import load_model
from autoslim.cli import main
from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import as_raw_data, load_data
from autoslim.errors import UsageError
from autoslim.methods import METHODS, describe_method
from autoslim.models import MODELS, create_model
from autoslim.models.adapt import adapt_model
from autoslim.registry import import_callable
from autoslim.search.space import SearchSpace
from autoslim.study import optimize
from autoslim.trial import run_trial

PLUGINS = Path(__file__).parent / "plugins"
METHOD = "toyplugin.method:Magnitude"
STUDY = {"name": "s", "data": {"name": "toyplugin.data:blobs"}, "model": "toyplugin.nets:make_net",
         "model_kwargs": {"width": 6}, "model_adapt": ["in_channels", "num_classes"],
         "methods": {METHOD: {"finetune_epochs": {"low": 0, "high": 1}}},
         "train": {"epochs": 1, "batch_size": 64}, "n_trials": 2}


# ---------------------------------------------------------------- models


def test_adapting_in_channels_keeps_what_the_network_computes_on_a_grey_image_repeated():
    net = make_net(width=4).eval()
    grey = torch.randn(2, 1, 8, 8)
    before = net(grey.repeat(1, 3, 1, 1))
    adapted = adapt_model(net, ["in_channels"], name="n", in_shape=(1, 8, 8), num_classes=1000)
    assert adapted[0].in_channels == 1 and adapted[6].out_features == 1000
    assert torch.allclose(adapted(grey), before, atol=1e-5)


class ClassifierFirst(nn.Module):
    """Attributes in the opposite order of the forward pass: the layers to adapt are found by running it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 7)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
        self.stem = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x).mean(1, keepdim=True).expand(-1, 3, -1, -1)[:, :, :2, :2]))


def test_adapting_follows_the_forward_pass_not_the_attribute_order():
    model = adapt_model(ClassifierFirst(), ["in_channels", "num_classes"], name="c", in_shape=(4, 6, 6),
                        num_classes=3)
    assert model.stem.in_channels == 4 and model.head.out_features == 3 and model.body[1].out_features == 5
    assert model(torch.zeros(2, 4, 6, 6)).shape == (2, 3)


@pytest.mark.parametrize("adapt,message", [
    ([], "model: 'toyplugin.nets:make_net' takes 3 input channels (first layer '0'), the data has 1; "
         "set model_adapt: [in_channels]"),
    (["num_classes"], "model: 'toyplugin.nets:make_net' takes 3 input channels"),
    (["in_channels"], "model: 'toyplugin.nets:make_net' outputs 1000 classes (last layer '6'), the data has 3 "
                      "classes; set model_adapt: [num_classes] (or the factory's own argument in model_kwargs)"),
])
def test_a_model_that_does_not_fit_the_data_is_one_line_saying_what_to_set(adapt, message):
    with pytest.raises(UsageError) as e:
        create_model("toyplugin.nets:make_net", in_shape=(1, 8, 8), num_classes=3, adapt=adapt)
    assert str(e.value).startswith(message), str(e.value)


def test_a_factory_gets_in_shape_and_num_classes_only_where_its_signature_names_them():
    seen = []

    def mine(*, num_classes, width=2):
        seen.append((num_classes, width))
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    MODELS.add("mine", mine)
    try:
        assert create_model("mine", in_shape=(1, 8, 8), num_classes=5, width=3)(torch.zeros(1, 1, 8, 8)).shape == (1, 5)
    finally:
        MODELS.remove("mine")
    assert seen == [(5, 3)]
    # torchvision's factories name neither; model_kwargs reach them, model_adapt fits the rest
    net = create_model("torchvision.models:resnet18", in_shape=(1, 8, 8), num_classes=4,
                       adapt=["in_channels", "num_classes"])
    assert net.conv1.in_channels == 1 and net.fc.out_features == 4


# ---------------------------------------------------------------- data


def test_a_source_may_return_tensors_datasets_or_a_dataloader():
    x, y = torch.rand(12, 2, 4, 4), torch.arange(12) % 3
    as_tensors = as_raw_data((x, y), where="w")
    as_dict = as_raw_data({"train_x": x, "train_y": y, "classes": ["a", "b", "c"]}, where="w")
    as_loader = as_raw_data(DataLoader(TensorDataset(x, y), batch_size=5), where="w")
    train, test = blob_datasets()
    pair = as_raw_data((train, test), where="w")
    for raw in (as_tensors, as_dict, as_loader):
        assert torch.equal(raw.train_x, x) and torch.equal(raw.train_y, y) and raw.num_classes == 3
    assert as_dict.classes == ["a", "b", "c"] and as_tensors.test_x is None
    assert (len(pair.train_y), len(pair.test_y), pair.num_classes) == (200, 60, 3)
    pil = torchvision.datasets.FakeData(size=6, image_size=(3, 5, 5), num_classes=2)
    raw = as_raw_data(pil, where="w")  # PIL images: uint8, read as [0, 1] floats
    assert raw.train_x.shape == (6, 3, 5, 5) and 0 <= raw.train_x.min() and raw.train_x.max() <= 1


def test_data_from_an_import_string_is_split_and_normalised_like_a_built_in_source():
    data = load_data(DataConfig(name="toyplugin.data:blobs", seed=3))
    assert len(data.train) + len(data.val) + len(data.test) == 240 and data.num_classes == 3
    assert data.in_shape == (1, 8, 8) and abs(float(data.train.x.mean())) < 0.1
    again = load_data(DataConfig(name="toy_blobs", seed=3))  # its entry point
    assert torch.equal(again.train.x, data.train.x)


@pytest.mark.parametrize("value,message", [
    (42, "returned int; accepted: a RawData, (train_x, train_y[, test_x, test_y]) tensors"),
    ({"train_x": torch.zeros(2, 1, 2, 2), "train_y": [0, 1], "labels": 1}, "returned a dict with key 'labels'"),
    ((torch.zeros(3, 1, 2, 2), torch.tensor([0.0, 1.0, 1.0])), "train: labels must be integers"),
    ((torch.zeros(3, 2), torch.tensor([0, 1, 1])), "train: expected images N x C x H x W (or N x H x W)"),
    ((torch.zeros(3, 4, 4), torch.tensor([0, 1, 1]), torch.zeros(2, 4, 4), None), "test_x and test_y must be given"),
    (TensorDataset(torch.zeros(2, 3)), "item 0 is tuple; accepted: (image, label) pairs"),
])
def test_a_source_returning_something_else_is_one_line(value, message):
    with pytest.raises(UsageError) as e:
        as_raw_data(value, where="data.name: 'p:f'")
    assert str(e.value).startswith("data.name: 'p:f'") and message in str(e.value) and "\n" not in str(e.value)


def test_train_fit_import_strings_resolve_or_are_one_line():
    assert import_callable("toyplugin.nets:make_net", field="train.fit") is make_net
    for spec, why in [("toyplugin.nope:fit", "module 'toyplugin.nope' not found"),
                      ("toyplugin.method:nope", "has no attribute 'nope'"), ("math:pi", "expected a callable")]:
        with pytest.raises(UsageError) as e:
            import_callable(spec, field="train.fit")
        assert str(e.value).startswith(f"train.fit: '{spec}'") and why in str(e.value)


# ---------------------------------------------------------------- methods and their search spaces


def test_a_search_space_file_is_read_once():
    assert SearchSpace.load("trimming") is SearchSpace.load("trimming")
    assert Magnitude.search_space().params is Magnitude.search_space().params


class Inline(Magnitude):
    name = "inline"
    space = {"summary": "inline knobs", "params": {"amount": {"type": "float", "low": 0.2, "high": 0.4,
                                                              "default": 0.3},
                                                   "finetune_epochs": {"type": "int", "low": 0, "high": 0,
                                                                       "default": 0},
                                                   "lr_scale": {"type": "float", "low": 0.1, "high": 0.1,
                                                                "default": 0.1}}}


class FromPath(Magnitude):
    name = "from_path"
    space = "plugins/toyplugin/toy_magnitude.yaml"  # relative to this module's folder


def test_a_method_declares_its_space_beside_its_code_inline_or_by_path():
    assert Magnitude.search_space().method == "toy_magnitude"
    assert Magnitude.search_space().params["amount"].high == 0.95  # toyplugin/toy_magnitude.yaml
    inline = Inline.search_space()
    assert inline.method == "inline" and inline.summary == "inline knobs" and inline.params["amount"].high == 0.4
    assert FromPath.search_space().method == "from_path" and FromPath.search_space().params.keys() == {
        "amount", "finetune_epochs", "lr_scale"}


@pytest.mark.parametrize("spec,message", [
    ("toyplugin.broken:NoSpace", "method 'no_space' declares no search space: "
                                 f"{PLUGINS / 'toyplugin' / 'no_space.yaml'} does not exist; accepted: no_space.yaml "
                                 "beside its module, or a class attribute space"),
    ("toyplugin.broken:Unnamed", "Unnamed has no name; set the class attribute name = '...'"),
    ("toyplugin.broken:Abstract", "Abstract does not implement compress"),
    ("toyplugin.method:KeepZeros", "expected a subclass of autoslim.Method"),
])
def test_a_method_that_is_not_one_is_one_line(spec, message):
    with pytest.raises(UsageError) as e:
        METHODS.get(spec, field="methods")
    assert str(e.value).startswith(f"methods: '{spec}': ") and message in str(e.value), str(e.value)


def test_an_import_string_method_runs_a_trial_like_a_registered_one(synthetic):
    config = TrialConfig(method=METHOD, params={"amount": 0.6, "finetune_epochs": 0}, model="lenet300_100",
                         data=DataConfig(name="synthetic"), train=TrainConfig(epochs=1, batch_size=32))
    result = run_trial(config, data=synthetic)
    assert result.sparse and result.params < result.baseline_params
    assert result.config.params == {"amount": 0.6, "finetune_epochs": 0, "lr_scale": 0.1}


def test_autoslim_methods_lists_built_in_and_installed_methods_with_their_knobs(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "toy_magnitude (entry point 'toyplugin.method:Magnitude'): Global magnitude pruning" in out
    assert "thriftynet (built-in, builds its own model): ThriftyNet" in out
    assert main(["methods", "toy_magnitude", METHOD, "-f", "json"]) == 0
    installed, imported = json.loads(capsys.readouterr().out)
    assert imported["origin"] == "import string" and imported["knobs"] == installed["knobs"]
    assert installed["knobs"] == [
        {"name": "amount", "type": "float", "low": 0.1, "high": 0.95, "log": False, "default": 0.5, "searched": True},
        {"name": "finetune_epochs", "type": "int", "low": 0, "high": 3, "log": False, "default": 1, "searched": True},
        {"name": "lr_scale", "type": "float", "low": 0.01, "high": 1.0, "log": True, "default": 0.1,
         "searched": False}]
    assert [m["name"] for m in describe_method("trimming")["knobs"]][:2] == ["rounds", "rule"]
    assert main(["methods", "toyplugin.nets:make_net"]) == 2
    assert capsys.readouterr().err == (
        "autoslim: error: methods: 'toyplugin.nets:make_net': expected a subclass of autoslim.Method, got "
        f"{make_net!r}\n")


# ---------------------------------------------------------------- a whole study from import strings


@pytest.fixture(scope="module")
def imported_study(tmp_path_factory):
    """A finished study whose model, data and method are all import strings into the user's package."""
    folder = tmp_path_factory.mktemp("imported")
    (folder / "s.yaml").write_text(yaml.safe_dump(STUDY))
    assert main(["optimize", str(folder / "s.yaml"), "--quiet"]) == 0
    return folder / "s.yaml"


def test_a_study_of_import_strings_runs_with_the_names_as_written(imported_study):
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{imported_study.parent}/s.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    warm = study.trials[0]  # the paper default of the method, enqueued under the study file's name of it
    assert warm.user_attrs["warm_start"] == "paper default" and warm.params[f"{METHOD}.amount"] == 0.5
    assert study.user_attrs["autoslim_config"]["model"] == "toyplugin.nets:make_net"
    config = study.trials[1].user_attrs["config"]
    assert config["method"] == METHOD and config["model_adapt"] == ["in_channels", "num_classes"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_study_of_import_strings_is_shown_reported_exported_and_retrained(imported_study, tmp_path, capsys):
    capsys.readouterr()
    assert main(["show", str(imported_study)]) == 0
    out = capsys.readouterr().out
    assert METHOD in out and "amount=0.5" in out and "method:Magnitude.amount" not in out
    assert main(["report", str(imported_study), "--out", str(tmp_path / "report")]) == 0
    assert METHOD in (tmp_path / "report" / "trials.csv").read_text()
    assert main(["export", str(imported_study), "--trial", "0", "--out", str(tmp_path / "ex")]) == 0
    exported = tmp_path / "ex" / "trial_0"
    model, x = load_model(exported / "model.pt"), torch.randn(3, 1, 8, 8)
    assert model[0].in_channels == 1 and model[6].out_features == 3
    assert torch.allclose(model(x), torch.jit.load(str(exported / "model.ts"))(x), atol=1e-5)
    assert main(["export", str(imported_study), "--trial", "1", "--retrain", "--out", str(tmp_path / "re")]) == 0
    assert main(["train", str(exported / "config.yaml"), "--out", str(tmp_path / "tr")]) == 0
    retrained = yaml.safe_load((tmp_path / "tr" / "config.yaml").read_text())
    assert retrained["method"] == METHOD and retrained["model"] == "toyplugin.nets:make_net"
    assert load_model(tmp_path / "tr" / "model.pt")(x).shape == (3, 3)


def test_a_fresh_process_resolves_the_import_strings_again(imported_study, tmp_path):
    """``autoslim show`` and ``export`` in a new process: the names stored in the study are imported anew."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "autoslim", "export", str(imported_study), "--trial", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert load_model(tmp_path / "trial_1" / "model.pt")(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


def test_a_study_of_entry_point_names_runs(tmp_path):
    cfg = StudyConfig.from_dict({**STUDY, "data": {"name": "toy_blobs"}, "model": "toy_net",
                                 "methods": {"toy_magnitude": {"finetune_epochs": 0}}, "n_trials": 1,
                                 "warm_start": False})
    study = optimize(cfg, storage="sqlite:///:memory:", log=lambda s: None)
    (trial,) = study.trials
    assert trial.user_attrs["method"] == "toy_magnitude" and "toy_magnitude.amount" in trial.params
    assert trial.user_attrs["nonzeros"] < trial.user_attrs["baseline_params"]


def test_autoslim_methods_says_where_each_method_comes_from():
    assert METHODS.origin("toy_magnitude") == "entry point 'toyplugin.method:Magnitude'"
    assert METHODS.origin("trimming") == "built-in" and METHODS.origin(METHOD) == "import string"
    assert describe_method(METHOD)["knobs"] == describe_method("toy_magnitude")["knobs"]
