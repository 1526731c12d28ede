"""The CLI: bad input gives one line and exit code 2 with nothing written; studies resume."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from helpers import spoil_model_file, tiny_study

from autoslim.cli import main

TINY = tiny_study()
NAME_RULE = "1 to 100 letters, digits, '-', '_' or '.', not starting with '-' or '.'"


def write(tmp_path: Path, body, name="s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return p


def with_(**changes):
    d = json.loads(json.dumps(TINY))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return d


BAD = [
    (with_(data__name="imagenet"), "data.name: unknown value 'imagenet'; accepted: cifar10, digits"),
    (with_(model="lenet7"), "model: unknown value 'lenet7'; accepted:"),
    (with_(methods={"prune": {}}), "methods: unknown value 'prune'; accepted:"),
    (with_(methods={"trimming": {"rounds": 99}}), "methods.trimming.rounds: 99 is out of range; accepted: 1 to 6"),
    (with_(methods={"trimming": {"rule": "median"}}), "methods.trimming.rule: unknown value 'median'; accepted: std, fraction"),
    (with_(methods={"trimming": {"depth": 1}}), "methods.trimming.depth: unknown parameter of 'trimming'"),
    (with_(train__epochs="ten"), "train.epochs: expected an integer, got 'ten'"),
    (with_(methods={"trimming": {"train": {"epochs": -1}}}), "methods.trimming.train.epochs: -1 is out of range; accepted: >= 0"),
    (with_(methods={"trimming": {"train": {"epoch": 3}}}), "methods.trimming.train.epoch: unknown key; accepted: epochs, "),
    (with_(methods={"trimming": {"train": 5}}), "methods.trimming.train: expected a mapping of train settings, got 5"),
    (with_(methods={"trimming": {"data": {"name": "mnist"}}}),
     "methods.trimming.data.name: a method may set only train_subset; the dataset and its split are the study's"),
    (with_(methods={"trimming": {"data": {"train_subset": 2.5}}}),
     "methods.trimming.data.train_subset: 2.5 is out of range; accepted: a count >= 1 or a fraction in (0, 1]"),
    (with_(methods={"trimming": {"data": [1]}}), "methods.trimming.data: expected a mapping of data settings, got [1]"),
    (with_(methods={"trimming": {"early_stopping": {"eta": 2}}}),
     "methods.trimming.early_stopping.eta: a method may set only rungs; eta and min_trials are the study's"),
    (with_(methods={"trimming": {"early_stopping": {"rungs": [3, 2]}}}),
     "methods.trimming.early_stopping.rungs: expected increasing positive numbers of epochs (0.25: a quarter "
     "into the first epoch), got [3, 2]"),
    (with_(early_stopping={"rungs": [0, 0.5]}),
     "early_stopping.rungs: expected increasing positive numbers of epochs (0.25: a quarter into the first epoch), "
     "got [0, 0.5]"),
    (with_(early_stopping={"rungs": [0.5, 0.25]}),
     "early_stopping.rungs: expected increasing positive numbers of epochs (0.25: a quarter into the first epoch), "
     "got [0.5, 0.25]"),
    (with_(early_stopping={"rungs": ["1"]}), "early_stopping.rungs[0]: expected a number, got '1'"),
    (with_(methods={"trimming": {"early_stopping": {"rungs": 4}}}),
     "methods.trimming.early_stopping.rungs: expected a list, got 4"),
    (with_(methods={"trimming": {"early_stopping": True}}),
     "methods.trimming.early_stopping: expected a mapping of early-stopping settings, got True"),
    (with_(train__lr=-1), "train.lr: -1.0 is out of range; accepted: > 0.0"),
    (with_(train__optimizer="lamb"), "train.optimizer: unknown value 'lamb'; accepted: sgd, adam, adamw"),
    (with_(n_trials=0), "n_trials: 0 is out of range; accepted: >= 1"),
    (with_(epochs=3), "epochs: unknown key; accepted: name, data, model"),
    (with_(data__name="mnist", data__download=False, data__data_dir="nowhere"), "data.data_dir: mnist files not found"),
    ("name: x\ndata: {name: digits\n", "malformed YAML"),
    # study names become file and folder names: nothing may escape the study file's folder or reach the logs raw
    (with_(name="../../escaped_db"), f"name: '../../escaped_db' is not a valid study name; accepted: {NAME_RULE}"),
    (with_(name="a/b"), "name: 'a/b' is not a valid study name"),
    (with_(name="two\nlines"), "name: 'two\\nlines' is not a valid study name"),
    (with_(name="tab\there"), "name: 'tab\\there' is not a valid study name"),
    (with_(name="c:d*e|f"), "name: 'c:d*e|f' is not a valid study name"),
    (with_(name=".hidden"), "name: '.hidden' is not a valid study name"),
    (with_(name=""), "name: '' is not a valid study name"),
    (with_(name="x" * 101), "is not a valid study name; accepted: 1 to 100 letters"),
    # a method that cannot compress the study's model is refused before anything is stored
    (with_(methods={"sss": {"level": "block"}}),
     "sss: no structure to scale at level 'block': LeNet300100 has no residual branch x + f(x)"),
    # choices the study file sets are refused where one cannot act (left unset, they are narrowed: test_target.py)
    (with_(methods={"sss": {"level": {"choices": ["channel", "block", "both"]}}}),
     "methods.sss.level: 'block', 'both' cannot act on model lenet300_100 (sss: no structure to scale at level "
     "'block'"),
    (with_(methods={"l1l2": {"layers": {"choices": ["all", "conv"]}}}),
     "methods.l1l2.layers: 'conv' cannot act on model lenet300_100 (l1l2: LeNet300100 has no removable channel group "
     "without a Linear producer"),
    # the user's own code by import string (tests/plugins/toyplugin): each refusal names the string and why
    (with_(model="no_such_pkg.nets:make"), "model: 'no_such_pkg.nets:make': module 'no_such_pkg' not found"),
    (with_(model="toyplugin.nets:nope"), "model: 'toyplugin.nets:nope': module 'toyplugin.nets' has no attribute"),
    (with_(model="toyplugin.nets:not_a_model"), "model: 'toyplugin.nets:not_a_model' returned str, not a torch.nn.Module"),
    (with_(model="toyplugin.nets:make_net", model_kwargs={"depth": 3}),
     "model: 'toyplugin.nets:make_net' failed with model_kwargs {'depth': 3}: TypeError: make_net() got an "
     "unexpected keyword argument 'depth'"),
    (with_(model="toyplugin.nets:make_net"), "model: 'toyplugin.nets:make_net' takes 3 input channels (first layer "
                                            "'0'), the data has 1; set model_adapt: [in_channels]"),
    (with_(model="toyplugin.nets:make_net", model_adapt=["in_channels"]),
     "model: 'toyplugin.nets:make_net' outputs 1000 classes (last layer '6'), the data has 10 classes; set "
     "model_adapt: [num_classes]"),
    (with_(model="toyplugin.nets:make_net", methods={"thriftynet": {"iterations": 4}}),
     "model: 'toyplugin.nets:make_net' takes 3 input channels"),  # unused by the trials, measured by the study
    (with_(model_adapt=["channels"]), "model_adapt[0]: unknown value 'channels'; accepted: in_channels, num_classes"),
    (with_(model_adapt="in_channels"), "model_adapt: expected a list, got 'in_channels'"),
    (with_(data__name="toyplugin.data:wrong"), "data.name: 'toyplugin.data:wrong' returned int; accepted: a RawData"),
    (with_(data__name="toyplugin.nets:make_net"), "data.name: 'toyplugin.nets:make_net' returned Sequential; accepted:"),
    (with_(methods={"toyplugin.nets:make_net": {}}), "methods: 'toyplugin.nets:make_net': expected a subclass of "
                                                     "autoslim.Method"),
    (with_(methods={"toyplugin.broken:NoSpace": {}}), "methods: 'toyplugin.broken:NoSpace': method 'no_space' "
                                                      "declares no search space: "),
    (with_(methods={"toyplugin.method:Magnitude": {"amount": 2}}),
     "methods.toyplugin.method:Magnitude.amount: 2 is out of range; accepted: 0.1 to 0.95"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, body, message):
    study = write(tmp_path, body)
    assert main(["optimize", str(study)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("autoslim: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_bad_input_writes_nothing_above_the_study_folder_either(tmp_path, capsys):
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    assert main(["optimize", str(write(folder, with_(name="../../escaped_db")))]) == 2
    assert "is not a valid study name" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/s.yaml"]


@pytest.mark.parametrize("file_name", ["my study.yaml", ".hidden.yaml", "-x.yaml"])
def test_a_study_file_whose_name_is_no_study_name_must_set_one(tmp_path, capsys, file_name):
    study = write(tmp_path, TINY, name=file_name)
    assert main(["optimize", str(study)]) == 2
    err = capsys.readouterr().err
    stem = file_name[:-len(".yaml")]
    assert err == (f"autoslim: error: name (unset, so the study file's name {file_name!r}): {stem!r} is not a valid "
                   f"study name; accepted: {NAME_RULE}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_name]
    assert main(["optimize", str(write(tmp_path, {**TINY, "name": "named"}, name=file_name)), "--n-trials", "1",
                 "--quiet"]) == 0
    assert (tmp_path / "named.db").is_file()


@pytest.mark.parametrize("name", ["../x", "a b", "new\nline"])
def test_a_bad_study_name_flag_is_one_line(tmp_path, capsys, name):
    study = write(tmp_path, TINY)
    assert main(["optimize", str(study), "--study-name", name]) == 2
    assert capsys.readouterr().err == (f"autoslim: error: --study-name: {name!r} is not a valid study name; "
                                       f"accepted: {NAME_RULE}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def _foreign_study(url: str, name: str) -> None:
    """A finished study made by someone else's code (any name Optuna accepts), with what a report reads."""
    study = optuna.create_study(storage=url, study_name=name, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "params"])
    study.set_user_attr("reference_point", {"accuracy": 0.0, "params": 1000.0})
    study.add_trial(optuna.trial.create_trial(values=[0.9, 100], user_attrs={"method": "trimming"}))


def test_report_builds_no_path_from_a_foreign_study_name(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/other.db"
    _foreign_study(url, "../evil")
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", url]) == 2
    err = capsys.readouterr().err
    assert err == (f"autoslim: error: --out: study name '../evil' cannot name a folder (accepted: {NAME_RULE}); "
                   "pass --out DIR\n")
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "evil").exists()
    assert main(["report", url, "--out", str(tmp_path / "chosen")]) == 0
    assert (tmp_path / "chosen" / "trials.csv").is_file()


def test_foreign_study_names_reach_the_terminal_quoted(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/other.db"
    for name in ("evil\nname", "\x1b[31mred"):
        _foreign_study(url, name)
    assert main(["show", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert "name one of: 'evil\\nname', '\\x1b[31mred'" in err
    assert main(["show", url, "--study-name", "evil\nname"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of study 'evil\\nname'" in out and "evil\nname" not in out


def _images(folder: Path, classes=("cat", "dog"), n=4) -> Path:
    """Noise images (their PNG data does not compress to a few bytes, so a truncated one lacks pixels)."""
    from PIL import Image

    gen = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(gen.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def _corrupt(folder: Path) -> str:
    (folder / "dog" / "2.png").write_bytes(b"\x89PNG not really")
    return "dog/2.png is not a readable image: UnidentifiedImageError"


def _truncated(folder: Path) -> str:
    png = folder / "cat" / "1.png"
    png.write_bytes(png.read_bytes()[:250])
    return "cat/1.png is not a readable image: OSError: image file is truncated"


def _one_class(folder: Path) -> str:
    for f in (folder / "dog").iterdir():
        f.unlink()
    (folder / "dog").rmdir()
    return f"{folder}: the training images are of 1 class; accepted: at least 2 classes"


@pytest.mark.parametrize("spoil", [_corrupt, _truncated, _one_class], ids=lambda f: f.__name__[1:])
def test_bad_image_data_is_one_line_exit_2_before_any_trial(tmp_path, capsys, spoil):
    images = _images(tmp_path / "images")
    expected = spoil(images)
    folder = tmp_path / "study"
    folder.mkdir()
    study = write(folder, with_(data={"name": "imagefolder", "data_dir": "../images", "image_size": 8}))
    assert main(["optimize", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: data.data_dir: ") and expected in err and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["s.yaml"]


TRIAL = {"method": "trimming", "params": {"rounds": 1, "retrain_epochs": 1, "apoz_examples": 100},
         "model": "lenet300_100", "data": {"name": "digits", "train_subset": 200},
         "train": {"epochs": 1, "batch_size": 64}, "seed": 0}
TRIAL_KEYS = "accepted: a trial's config.yaml with method, model, data, train, seed"


def trial_with(drop=(), **params):
    d = {k: v for k, v in json.loads(json.dumps(TRIAL)).items() if k not in drop}
    if "params" in d:
        d["params"].update(params)
    return d


TRAIN_BAD = [
    (trial_with(rounds=-7), "params.rounds: -7 is out of range; accepted: 1 to 6"),
    (trial_with(fraction=7.5), "params.fraction: 7.5 is out of range; accepted: 0.05 to 0.3"),
    (trial_with(rule="median"), "params.rule: unknown value 'median'; accepted: std, fraction"),
    (trial_with(depth=2), "params.depth: unknown parameter of 'trimming'; accepted: alpha, apoz_examples, "),
    ({**TRIAL, "params": 5}, "params: expected a mapping, got 5"),
    ({**TRIAL, "method": "prune"}, "method: unknown value 'prune'; accepted: iht, l1l2, sss, thriftynet, toy_magnitude, trimming"),
    ({**TRIAL, "model": "lenet7"}, "model: unknown value 'lenet7'; accepted:"),
    ({**TRIAL, "model": "no_such_pkg.nets:make"}, "model: 'no_such_pkg.nets:make': module 'no_such_pkg' not found"),
    ({**TRIAL, "method": "toyplugin.broken:Unnamed"}, "method: 'toyplugin.broken:Unnamed': Unnamed has no name"),
    ({**TRIAL, "model_adapt": ["classes"]}, "model_adapt[0]: unknown value 'classes'; accepted: in_channels, "),
    ({**TRIAL, "train": {"epochs": -1}}, "train.epochs: -1 is out of range; accepted: >= 0"),
    ({"method": "trimming", "params": {"rounds": 2}}, f"config file: c.yaml has no 'model'; {TRIAL_KEYS}"),
    (trial_with(drop=["data"]), f"config file: c.yaml has no 'data'; {TRIAL_KEYS}"),
    (trial_with(drop=["train"]), f"config file: c.yaml has no 'train'; {TRIAL_KEYS}"),
    (trial_with(drop=["seed"]), f"config file: c.yaml has no 'seed'; {TRIAL_KEYS}"),
    (trial_with(drop=["method"]), f"config file: c.yaml has no 'method'; {TRIAL_KEYS}"),
    ("method: trimming\nparams: {rounds: 1\n", "config file: c.yaml: line 3, column 1 malformed YAML"),
]


@pytest.mark.parametrize("body,message", TRAIN_BAD, ids=[m.split(":")[0] for _, m in TRAIN_BAD])
def test_bad_train_config_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, body, message):
    config = write(tmp_path, body, name="c.yaml")
    assert main(["train", "c.yaml", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoslim: error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]


def test_train_fills_the_parameters_a_config_leaves_out_and_says_so(tmp_path, capsys):
    body = {**TRIAL, "params": {"rounds": 1, "retrain_epochs": 1}}
    write(tmp_path, body, name="c.yaml")
    assert main(["train", "c.yaml", "--out", "out"]) == 0
    err = capsys.readouterr().err
    assert ("[train] trimming: parameters not in the config, from its search space: rule=std alpha=1 fraction=0.1 "
            "layers=all lr_scale=0.1 apoz_examples=2000\n") in err
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["params"] == {"rounds": 1, "rule": "std", "alpha": 1.0, "fraction": 0.1, "layers": "all",
                                 "retrain_epochs": 1, "lr_scale": 0.1, "apoz_examples": 2000}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A study file whose study holds one completed trial, with its model.pt artifact."""
    study = write(tmp_path_factory.mktemp("finished"), TINY)
    assert main(["optimize", str(study), "--n-trials", "1", "--quiet"]) == 0
    return study


EXPORT_BAD = [("garbage", "cannot be read: UnpicklingError: "),
              ("pickle payload", "cannot be read: UnpicklingError: it holds objects other than tensors and plain data"),
              ("no spec", ": spec is missing or not a dict; accepted: a file written by autoslim"),
              ("wrong shapes", ": its weights do not fit its architecture: RuntimeError: size mismatch for "),
              ("a layer the model lacks", ": its architecture does not fit its model: ")]


@pytest.mark.parametrize("spoil,message", EXPORT_BAD, ids=[s for s, _ in EXPORT_BAD])
def test_export_of_a_bad_model_artifact_is_one_line_naming_the_artifact(finished, tmp_path, capsys, spoil, message):
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{finished.parent}/s.db")
    (meta,) = [m for m in optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
               if m.filename == "model.pt"]
    artifact = finished.parent / "s-artifacts" / meta.artifact_id
    good = artifact.read_bytes()
    try:
        spoil_model_file(artifact, spoil, out=artifact)
        capsys.readouterr()
        assert main(["export", str(finished), "--trial", "0", "--out", str(tmp_path / "x")]) == 2
    finally:
        artifact.write_bytes(good)
    err = capsys.readouterr().err
    assert err.startswith(f"autoslim: error: model file: the model.pt artifact {meta.artifact_id} of trial 0")
    assert message in err and err.count("\n") == 1 and "trial_0/model.pt" not in err, err
    assert "weights_only" not in err and "False" not in err
    assert not (tmp_path / "x").exists()


READ_VERBS = [["show"], ["best"], ["report"], ["export", "--pareto"], ["dashboard"], ["recover", "--older-than", "1m"]]


@pytest.mark.parametrize("argv", READ_VERBS, ids=lambda a: a[0])
@pytest.mark.parametrize("how", ["target", "--storage"])
def test_a_verb_given_a_journal_that_does_not_exist_creates_nothing(tmp_path, capsys, argv, how):
    journal = tmp_path / "none.journal"
    args = [journal.name] if how == "target" else [str(write(tmp_path, TINY)), "--storage", journal.name]
    before = sorted(tmp_path.iterdir())
    assert main([argv[0], *args, *argv[1:]]) == 2
    err = capsys.readouterr().err
    expected = ("no journal file at none.journal" if how == "target" else f"has not been run yet (no none.journal); "
                f"run `autoslim optimize {args[0]} --storage none.journal` first")
    assert err.startswith("autoslim: error: study: ") and expected in err and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == before


def test_missing_study_file_and_unreachable_storage(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    study = write(tmp_path, TINY)
    assert main(["optimize", str(study), "--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"]) == 2
    assert "--storage:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_show_unknown_study_name(tmp_path, capsys):
    study = write(tmp_path, TINY)
    assert main(["optimize", str(study), "--n-trials", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["show", f"sqlite:///{tmp_path}/s.db", "--study-name", "nope"]) == 2
    assert "--study-name: no study 'nope'" in capsys.readouterr().err


def test_a_resumed_study_runs_only_the_remaining_trials(tmp_path, capsys):
    study = write(tmp_path, TINY)
    assert main(["optimize", str(study)]) == 0
    out = capsys.readouterr()
    assert "Pareto front of study 's'" in out.out and "[trial 1]" in out.err
    loaded = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    first = [(t.number, t.values, t.datetime_complete) for t in loaded.trials]
    assert len(first) == 2 and loaded.metric_names == ["accuracy", "params"]
    assert main(["optimize", str(study)]) == 0  # nothing left to do
    assert main(["optimize", str(study), "--n-trials", "3"]) == 0
    again = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    assert [(t.number, t.values, t.datetime_complete) for t in again.trials][:2] == first
    assert len(again.trials) == 3
    t = again.trials[2]
    assert {"val_accuracy", "test_accuracy", "params", "nonzeros", "flops", "latency_ms", "latency_iqr_ms",
            "widths_after", "seconds", "config"} <= set(t.user_attrs)
    assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["params"]]
    capsys.readouterr()
    assert main(["show", str(study), "-f", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["front"] and {"trial", "method", "accuracy", "params"} <= set(result["front"][0])
    assert [r["trial"] for r in result["hypervolume_history"]] == [0, 1, 2] and 0 < result["hypervolume"] <= 1


def test_show_counts_finished_trials_and_says_what_is_queued(tmp_path, capsys):
    """A queued trial (a warm start, a retry, a slot of --n-trials) is not counted as a trial of the front."""
    study = write(tmp_path, TINY)
    assert main(["optimize", str(study), "--n-trials", "1", "--quiet"]) == 0
    loaded = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    loaded.enqueue_trial({"method": "trimming"})
    capsys.readouterr()
    assert main(["show", str(study), "-f", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["trials"], result["waiting"], result["running"], result["failed"]) == (1, 1, 0, 0)
    assert main(["show", str(study)]) == 0
    out = capsys.readouterr().out
    assert f"({len(result['front'])} of 1 finished trials on it; 0 stopped early, " in out
    assert ", 0 failed; 1 queued; objectives: " in out


def test_python_dash_m_and_exit_code(tmp_path):
    study = write(tmp_path, with_(model="nope"))
    proc = subprocess.run([sys.executable, "-m", "autoslim", "optimize", str(study)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("autoslim: error: model: unknown value 'nope'")
