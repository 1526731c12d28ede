"""Per-trial artifacts: every completed trial uploads its model, charts and note; none without a store."""

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna_dashboard import get_note

from helpers import tiny_study

from autoslim.artifacts import trial_artifacts
from autoslim.storage import default_artifact_dir, open_artifact_store
from autoslim.config import StudyConfig, load_study
from autoslim.modelfile import load_model
from autoslim.study import optimize

TINY = tiny_study(name="tiny", n_trials=1)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifacts")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    optimize(load_study(folder / "tiny.yaml"), log=lambda s: None)
    return folder


def test_completed_trial_uploads_model_charts_and_note(study_dir):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'tiny.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
    assert sorted(m.filename for m in metas) == ["model.pt", "note.md", "training.png", "widths.png"]
    folder = study_dir / "tiny-artifacts"
    for m in metas:
        assert (folder / m.artifact_id).stat().st_size > 100
    files = {name: folder / m.artifact_id for name, m in trial_artifacts(study, trial).items()}
    assert files["widths.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" == files["training.png"].read_bytes()[:8]
    note = files["note.md"].read_text()
    assert note.startswith("## Trial 0: trimming") and "compression" in note and "FLOPs" in note
    assert get_note(optuna.trial.Trial(study, trial._trial_id)) == note  # shown by optuna-dashboard
    model = load_model(files["model.pt"])
    assert sum(p.numel() for p in model.parameters()) == trial.user_attrs["params"]
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_the_model_file_and_the_note_say_what_the_model_expects(study_dir, digits):
    """Input shape, per-channel normalisation and class names travel with the model (issue 18 item 5)."""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'tiny.db'}")
    files = {name: study_dir / "tiny-artifacts" / m.artifact_id
             for name, m in trial_artifacts(study, study.trials[0]).items()}
    expects = torch.load(files["model.pt"], weights_only=True)["spec"]["input"]
    assert expects == digits.input_spec() and expects["shape"] == [1, 8, 8] and len(expects["mean"]) == 1
    assert expects["classes"] == [str(c) for c in range(10)]
    note = files["note.md"].read_text()
    assert f"| input | shape (1, 8, 8), normalised per channel: mean ({expects['mean'][0]:.4g}), " in note
    assert "| classes (output order) | `0`, `1`," in note


def test_artifact_folder_sits_beside_file_storages(tmp_path):
    assert default_artifact_dir(f"sqlite:///{tmp_path}/runs/x.db") == tmp_path / "runs" / "x-artifacts"
    assert default_artifact_dir(str(tmp_path / "x.journal")) == tmp_path / "x-artifacts"
    assert default_artifact_dir("sqlite:///:memory:") is None
    assert default_artifact_dir("postgresql://user@db/optuna") is None
    assert open_artifact_store("postgresql://user@db/optuna") is None
    open_artifact_store("postgresql://user@db/optuna", location=tmp_path / "a", create=True)
    assert (tmp_path / "a").is_dir()


def test_trials_run_without_an_artifact_store():
    study = optimize(StudyConfig.from_dict(TINY), storage="sqlite:///:memory:", log=lambda s: None)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage) == []



def test_a_study_files_artifact_dir_is_used_by_optimize_and_export(tmp_path):
    from autoslim.cli import main

    (tmp_path / "runs").mkdir()
    study_file = tmp_path / "runs" / "tiny.yaml"
    study_file.write_text(yaml.safe_dump({**TINY, "artifact_dir": "../common/art"}))
    cfg = load_study(study_file)
    assert cfg.artifact_dir == str(tmp_path / "common" / "art")  # read from the study file's folder
    study = optimize(cfg, log=lambda s: None)
    (trial,) = study.trials
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
    assert len(metas) == 4 and all((tmp_path / "common" / "art" / m.artifact_id).is_file() for m in metas)
    assert not (tmp_path / "runs" / "tiny-artifacts").exists()
    # export finds the model there without --artifact-dir (else it would fail: nothing beside the database)
    assert main(["export", str(study_file), "--trial", "0", "--out", str(tmp_path / "out")]) == 0
    model = load_model(tmp_path / "out" / "trial_0" / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == trial.user_attrs["params"]


def test_a_trial_failed_during_its_upload_leaves_no_orphaned_file(tmp_path, digits):
    """Failed under its worker between two uploads: what it uploaded before is its own, the file whose record
    Optuna refused is removed."""
    from autoslim.artifacts import upload_trial_artifacts
    from autoslim.config import DataConfig, TrainConfig, TrialConfig
    from autoslim.methods import get_method
    from autoslim.trial import run_trial

    params = get_method("trimming").search_space().complete({"rounds": 1, "retrain_epochs": 1}, where="trimming")
    config = TrialConfig(method="trimming", params=params, model="lenet300_100", data=DataConfig(name="digits"),
                         train=TrainConfig(epochs=1))
    result = run_trial(config, data=digits)
    study = optuna.create_study()
    trial = study.ask()
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    write = store.write

    def write_then_fail_on_the_second(artifact_id, content):
        write(artifact_id, content)
        if len(list(tmp_path.iterdir())) == 2:  # another process fails the trial now
            study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)

    store.write = write_then_fail_on_the_second
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        upload_trial_artifacts(trial, result, artifact_store=store, in_shape=digits.in_shape, num_classes=10)
    (meta,) = optuna.artifacts.get_all_artifact_meta(trial)
    assert meta.filename == "model.pt" and [p.name for p in tmp_path.iterdir()] == [meta.artifact_id]
