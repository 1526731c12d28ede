"""The examples in examples/ run as a user runs them, on a few generated images (issue 19 item 7)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from PIL import Image

from autoslim.cli import main as cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def images(tmp_path) -> Path:
    """An ImageFolder of 3 classes x 10 RGB images, 32x32, each class its own colour plus noise."""
    gen = torch.Generator().manual_seed(0)
    for c in range(3):
        folder = tmp_path / "images" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(10):
            colour = torch.full((3,), 60.0).index_fill(0, torch.tensor([c]), 170.0)
            pixels = torch.rand(32, 32, 3, generator=gen) * 80 + colour
            Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return tmp_path / "images"


def test_a_resnet18_study_file_with_import_strings(images, tmp_path):
    study = yaml.safe_load((EXAMPLES / "resnet18_imagefolder.yaml").read_text())
    study["data"].update(data_dir=str(images), image_size=32)  # the example's study, on the generated images
    study.update(n_trials=1, train={**study["train"], "epochs": 1, "batch_size": 8},
                 methods={"trimming": study["methods"]["trimming"]})  # l1l2 and sss need more than one epoch
    path = tmp_path / "resnet18_imagefolder.yaml"
    path.write_text(yaml.safe_dump(study))
    assert cli(["optimize", str(path), "--quiet"]) == 0
    storage = f"sqlite:///{tmp_path / (study['name'] + '.db')}"
    (trial,) = optuna.load_study(study_name=study["name"], storage=storage).trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    config = trial.user_attrs["config"]
    assert config["model"] == "torchvision.models:resnet18" and config["pruning"] == {"ignore": ["fc"], "round_to": 8}
    widths = trial.user_attrs["widths_after"]
    assert widths["fc"] == 3 and trial.user_attrs["params"] < trial.user_attrs["baseline_params"]
    assert all(w % 8 == 0 for name, w in widths.items() if name != "fc")


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_your_own_loop_in_your_own_optuna_study(images):
    own = _module(EXAMPLES / "own_study.py")
    study = own.main(data_dir=str(images), n_trials=1, epochs=1, image_size=32)
    (trial,) = study.trials
    assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), trial.user_attrs
    assert trial.params["method"] in ("trimming", "l1l2") and 0 <= trial.user_attrs["val_accuracy"] <= 1
    if trial.state == TrialState.COMPLETE:
        assert trial.values[1] == trial.user_attrs["params"] < trial.user_attrs["baseline_params"]


@pytest.fixture
def slimplugin_installed(tmp_path, monkeypatch):
    """examples/slimplugin as `pip install examples/slimplugin` would leave it: its package importable and its
    entry points (from its pyproject.toml) in a dist-info on sys.path."""
    import tomllib
    project = tomllib.loads((EXAMPLES / "slimplugin" / "pyproject.toml").read_text())["project"]
    info = tmp_path / "site" / f"slimplugin-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: slimplugin\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
        for group, points in project["entry-points"].items()))
    monkeypatch.syspath_prepend(str(EXAMPLES / "slimplugin" / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("slimplugin.l1norm", None)


def test_a_sixth_method_in_its_own_package_found_by_its_entry_point(slimplugin_installed, tmp_path, capsys):
    assert cli(["methods", "l1norm"]) == 0
    assert "L1 norm" in capsys.readouterr().out
    study = {"name": "l1norm_digits", "data": {"name": "digits"}, "model": "lenet5", "methods": ["l1norm"],
             "train": {"epochs": 1, "batch_size": 64}, "n_trials": 1, "pruning": {"ignore": ["classifier.fc1"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert cli(["optimize", str(tmp_path / "s.yaml"), "--quiet"]) == 0
    storage = f"sqlite:///{tmp_path / 'l1norm_digits.db'}"
    (trial,) = optuna.load_study(study_name="l1norm_digits", storage=storage).trials
    assert trial.state == TrialState.COMPLETE and trial.params["method"] == "l1norm"
    before, after = trial.user_attrs["widths_before"], trial.user_attrs["widths_after"]
    assert after["features.conv1"] == before["features.conv1"] // 2  # amount 0.5 (its published setting)
    assert after["classifier.fc1"] == before["classifier.fc1"]  # ignored
    assert trial.user_attrs["params"] < trial.user_attrs["baseline_params"]
