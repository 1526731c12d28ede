"""Crash recovery: per-epoch checkpoints, resuming exactly, ``autoslim recover``, and bad files and names.

A resumed trial must end with the very weights of an uninterrupted one (on one
machine); a journal study whose worker died is repaired by ``autoslim recover``
and the retry resumes; unreadable checkpoints and model files, unknown study
names are one line (exit code 2 where a command is given them) and change nothing.
"""

import io
import os
import signal
import time
from datetime import datetime

import optuna
import pytest
import torch
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from worker_helpers import (SLOW_STUDY, WORKER_STUDY, checkpointed_mid_trial, start_worker, trained_epochs,
                            wait_for, write_study)

from autoslim.checkpoint import FORMAT, Checkpointer, TrialCheckpoints, epochs_in, read_checkpoint
from autoslim.cli import main
from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.storage import open_artifact_store, study_lock
from autoslim.heartbeat import Heartbeat
from autoslim.methods import get_method
from autoslim.recover import requeue
from autoslim.trial import run_trial
from autoslim.train import Callback


class Crash(Exception):
    pass


class CrashAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, model, record) -> None:
        if record["epoch"] == self.epoch:
            raise Crash


def round_trip(payload: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return read_checkpoint(buffer)


CASES = [("trimming", "lenet300_100", {"rounds": 2, "retrain_epochs": 1}, [1, 3]),  # surgery between phases
         ("iht", "lenet300_100", {"cycles": 2, "sparse_epochs": 1, "dense_epochs": 1}, [3]),  # masks from weights
         ("sss", "lenet5", {"finetune_epochs": 1, "level": "channel"}, [1])]             # extra optimizer state


@pytest.mark.parametrize("method,model,params,crashes", CASES, ids=[c[0] for c in CASES])
def test_a_resumed_trial_ends_exactly_as_an_uninterrupted_one(method, model, params, crashes):
    data_cfg = DataConfig(name="digits", train_subset=150)
    data = load_data(data_cfg)
    params = get_method(method).search_space().complete(params, where=method)
    config = TrialConfig(method=method, params=params, model=model, data=data_cfg,
                         train=TrainConfig(epochs=2, batch_size=32), seed=3)
    whole = run_trial(config, data=data)
    for k in crashes:
        saved = []
        with pytest.raises(Crash):
            run_trial(config, data=data, callbacks=[CrashAfter(k)],  # killed right after epoch k's line
                      checkpointer=Checkpointer(save=lambda p: saved.append(round_trip(p))))
        assert [c["current"]["loop"]["fit"]["step"] > 0 for c in saved] == [True] * k
        resumed_epochs = []
        resumed = run_trial(config, data=data, callbacks=[RecordEpochs(resumed_epochs)],
                            checkpointer=Checkpointer(save=lambda p: None, resume=saved[-1]))
        assert resumed_epochs == list(range(k + 1, len(whole.history) + 1))  # nothing trained twice
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"crash after epoch {k}"
        assert [r["phase"] for r in resumed.history] == [r["phase"] for r in whole.history]
        assert resumed.val_accuracy == whole.val_accuracy and resumed.params == whole.params


def test_an_epoch_is_checkpointed_before_its_line_is_printed_and_its_rung_recorded():
    """A worker killed right after an epoch's progress line (or rung record) must not lose that epoch."""
    from autoslim.methods import TrialContext
    from autoslim.models import create_model
    from autoslim.trial import EpochPrinter

    data = load_data(DataConfig(name="digits", train_subset=100))
    saved, seen = [], []

    def checkpointed(record) -> tuple:
        last = saved[-1]["current"]["history"][-1] if saved else {}
        return record["epoch"], epochs_in(saved[-1]) if saved else 0, last.get("phase")

    class Rung(Callback):  # stands for the early-stopping rung record
        def on_epoch_end(self, model, record) -> None:
            seen.append(("rung", *checkpointed(record)))

    printer = EpochPrinter(lambda line: seen.append(("line", *checkpointed({"epoch": int(line.split()[2])}))), "[t]")
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=2, batch_size=50), callbacks=[printer, Rung()],
                       checkpointer=Checkpointer(save=saved.append))
    ctx.train(create_model("lenet300_100", in_shape=data.in_shape, num_classes=10), phase="warmup")
    assert seen == [("line", 1, 1, "warmup"), ("rung", 1, 1, "warmup"), ("line", 2, 2, "warmup"),
                    ("rung", 2, 2, "warmup")]


class RecordEpochs(Callback):
    def __init__(self, into: list) -> None:
        self.into = into

    def on_epoch_end(self, model, record) -> None:
        self.into.append(record["epoch"])


def journal_study(path: str, name: str, storage=None) -> optuna.Study:
    storage = storage or optuna.storages.JournalStorage(JournalFileBackend(path))
    return optuna.load_study(study_name=name, storage=storage)


def test_recover_requeues_a_dead_workers_journal_trial_and_the_retry_resumes(tmp_path, capsys):
    study, journal = write_study(tmp_path, SLOW_STUDY, n_trials=2), str(tmp_path / "s.journal")
    worker = start_worker(study, journal, log=tmp_path / "killed.log")
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    victim = wait_for(lambda: journal_study(journal, study.stem, storage),
                      lambda t: checkpointed_mid_trial(t, last_epoch=3))
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    size = os.path.getsize(journal)

    assert main(["recover", str(study), "--storage", journal, "--older-than", "10m"]) == 0
    assert "no stale trials (1 running" in capsys.readouterr().out and os.path.getsize(journal) == size
    time.sleep(2.1)  # twice its heartbeat interval: the youngest age recover accepts
    assert main(["recover", str(study), "--storage", journal, "--older-than", "2s"]) == 0
    out = capsys.readouterr().out
    assert f"trial {victim.number}: failed; retry queued as trial 2 (resumes after epoch" in out  # 0, 1: the slots

    assert main(["optimize", str(study), "--storage", journal]) == 0
    err = capsys.readouterr().err
    trials = journal_study(journal, study.stem).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == victim.number and retry.params == victim.params
    resumed = retry.user_attrs["resumed_from"]["epoch"]
    assert resumed >= victim.user_attrs["checkpoint"]["epoch"] and min(trained_epochs(err, 2)) == resumed + 1 > 1
    assert f"[trial 2] resuming trial {victim.number} from its checkpoint after epoch {resumed}" in err
    # the base trained once for the study (3 epochs, stored by the killed worker, loaded by this one), then the
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [1, 2, 3, 4, 5]  # trial's 5 retrain epochs
    assert retry.user_attrs["info"]["base"]["trained"] is False
    assert not any((tmp_path / "s-artifacts").glob("checkpoint-*"))  # removed once the trials finished


def _artifacts_are_all_referenced(study: optuna.Study, folder) -> None:
    """No orphan: every file in the artifact folder is an artifact of some trial or of the study (its shared base
    network), none a checkpoint."""
    referenced = {m.artifact_id for t in [study, *study.get_trials(deepcopy=False)]
                  for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
    files = {p.name for p in folder.iterdir()}
    assert files and files <= referenced and not any(f.startswith("checkpoint-") for f in files)


def test_a_worker_whose_training_trial_is_failed_under_it_stops_in_one_line_and_its_retry_resumes(tmp_path):
    study, journal = write_study(tmp_path, SLOW_STUDY, n_trials=1), str(tmp_path / "s.journal")
    log = tmp_path / "worker.log"
    worker = start_worker(study, journal, log=log)
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    load = lambda: journal_study(journal, study.stem, storage)  # noqa: E731
    victim = wait_for(load, lambda t: checkpointed_mid_trial(t, last_epoch=3))
    with study_lock(journal):  # what `autoslim recover` with an age shorter than an epoch did to a live worker
        requeue(load(), storage.get_trial(victim._trial_id), log=lambda s: None)
    assert worker.wait(timeout=120) == 0
    text = log.read_text()
    trials = load().get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and "Traceback" not in text
    resumed = trials[1].user_attrs["resumed_from"]["epoch"]
    assert [line for line in text.splitlines() if "was failed" in line] == [
        "[trial 0] was failed while it ran in this worker (`autoslim recover`, or a stale heartbeat); "
        f"stopped it: its retry, trial 1, resumes after epoch {resumed}"]
    assert resumed >= 1 and min(trained_epochs(text, 1)) == resumed + 1
    _artifacts_are_all_referenced(load(), tmp_path / "s-artifacts")


def test_recover_leaves_a_trial_with_a_fresh_heartbeat_alone(tmp_path, capsys):
    """No checkpoint, a start longer ago than --older-than: only the heartbeat says the worker is alive."""
    # 40 epochs of ~0.1 s: the trial must still run 3.5 s after it started (14 epochs could finish in 2.6 s)
    study = write_study(tmp_path, SLOW_STUDY, n_trials=1, train={"epochs": 40, "batch_size": 8},
                        recovery={"heartbeat_interval": 1, "checkpoint": False})
    journal = str(tmp_path / "s.journal")
    worker = start_worker(study, journal, log=tmp_path / "worker.log")
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    wait_for(lambda: journal_study(journal, study.stem, storage),
             lambda t: t.state == TrialState.RUNNING and (datetime.now() - t.datetime_start).total_seconds() > 3.5)
    assert main(["recover", str(study), "--storage", journal, "--older-than", "3s"]) == 0  # 3 heartbeat intervals
    assert "no stale trials (1 running, none silent for more than 3s)" in capsys.readouterr().out
    assert worker.wait(timeout=120) == 0
    assert [t.state for t in journal_study(journal, study.stem).trials] == [TrialState.COMPLETE]


def test_recover_refuses_an_age_a_live_heartbeat_can_reach(tmp_path, capsys):
    journal = str(tmp_path / "s.journal")
    study = optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(journal)))
    with Heartbeat(study.ask(), every=60):
        pass
    size = os.path.getsize(journal)
    assert main(["recover", journal, "--older-than", "90s"]) == 2
    assert capsys.readouterr().err == ("autoslim: error: --older-than: 90s would fail trials whose workers are alive: "
                                       "running trial 0 writes a heartbeat every 60s; accepted: 120s or more\n")
    assert os.path.getsize(journal) == size
    assert main(["recover", journal, "--older-than", "2m"]) == 0
    assert "no stale trials (1 running" in capsys.readouterr().out


@pytest.mark.parametrize("retry_started", [False, True], ids=["retry waiting", "retry started"])
def test_a_result_finished_after_its_trial_was_failed_goes_to_the_retry_or_is_discarded(tmp_path, monkeypatch,
                                                                                         retry_started):
    """The trial is failed (and its retry queued) between its training and its measurements."""
    import autoslim.trial as objective
    from autoslim.config import load_study
    from autoslim.study import optimize

    study_file, journal = write_study(tmp_path, WORKER_STUDY, n_trials=1), str(tmp_path / "s.journal")
    other = optuna.storages.JournalStorage(JournalFileBackend(journal))  # another process's view
    measure = objective.measure

    def fail_then_measure(*args, **kwargs):
        study = journal_study(journal, study_file.stem, other)
        retry = requeue(study, study.trials[0], log=lambda s: None)
        if retry_started:
            assert other.set_trial_state_values(retry._trial_id, state=TrialState.RUNNING)
        return measure(*args, **kwargs)

    monkeypatch.setattr(objective, "measure", fail_then_measure)
    lines = []
    # the worker then waits for the retry "another worker" runs (and would retry it once its heartbeat is stale):
    # the timeout lets it go first
    optimize(load_study(study_file), storage=journal, log=lines.append, timeout=5)
    study = journal_study(journal, study_file.stem)
    lost = "[trial 0] was failed while it ran in this worker (`autoslim recover`, or a stale heartbeat); its finished "
    (line,) = [line for line in lines if "was failed" in line]
    assert line.startswith(lost + "result (val ") and not any(" done in " in line for line in lines)
    victim, retry = study.trials
    assert victim.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    if retry_started:
        assert line.endswith(") is discarded: its retry, trial 1, has started") and retry.state == TrialState.RUNNING
        # nothing uploaded for the lost trial; its last checkpoint is kept for the retry that resumes from it
        kept = {p.name for p in (tmp_path / "s-artifacts").iterdir()}
        base = {m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(study, storage=study._storage)}
        assert kept - base == {retry.user_attrs["checkpoint"]["artifact_id"]} and len(base) == 1  # and the base
    else:
        assert line.endswith(") is stored as its retry's, trial 1") and retry.state == TrialState.COMPLETE
        assert retry.values == [retry.user_attrs["val_accuracy"], retry.user_attrs["params"]]
        assert f"val {100 * retry.user_attrs['val_accuracy']:.2f}%, params {retry.user_attrs['params']:,}" in line
        assert sum(line.startswith("[trial 1] epoch") for line in lines) == 0  # not trained again
        _artifacts_are_all_referenced(study, tmp_path / "s-artifacts")
        assert {m.filename for m in optuna.artifacts.get_all_artifact_meta(retry, storage=study._storage)} == {
            "model.pt", "widths.png", "training.png", "note.md"}


def test_ctrl_c_requeues_the_trial_in_progress_and_the_next_run_resumes_it(tmp_path, capsys):
    study, journal = write_study(tmp_path, SLOW_STUDY, n_trials=1), str(tmp_path / "s.journal")
    worker = start_worker(study, journal, log=tmp_path / "interrupted.log")
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    wait_for(lambda: journal_study(journal, study.stem, storage), lambda t: checkpointed_mid_trial(t, last_epoch=3))
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=60) == 130
    assert "trial 0: failed; retry queued as trial 1 (resumes after epoch" in (tmp_path / "interrupted.log").read_text()
    assert main(["optimize", str(study), "--storage", journal]) == 0
    trials = journal_study(journal, study.stem).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    resumed = trials[1].user_attrs["resumed_from"]
    assert resumed["trial"] == 0 and min(trained_epochs(capsys.readouterr().err, 1)) == resumed["epoch"] + 1 > 1


def test_recover_refuses_a_bad_age_before_touching_anything(tmp_path, capsys):
    study = write_study(tmp_path, WORKER_STUDY)
    assert main(["recover", str(study), "--older-than", "soon"]) == 2
    assert capsys.readouterr().err == ("autoslim: error: --older-than: 'soon' is not an age; accepted: a number "
                                       "with s, m, h or d (e.g. 10m)\n")
    assert [p.name for p in tmp_path.iterdir()] == [study.name]


def _finished_study(folder):
    """A journal study with one completed trial (its artifacts beside it)."""
    study, journal = write_study(folder, WORKER_STUDY, n_trials=1), str(folder / "s.journal")
    assert main(["optimize", str(study), "--storage", journal, "--quiet"]) == 0
    return study, journal


@pytest.fixture
def finished_study(tmp_path):
    return _finished_study(tmp_path)


@pytest.fixture(scope="module")
def unchanged_study(tmp_path_factory):
    return _finished_study(tmp_path_factory.mktemp("recovery"))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content,reason", [(b"\x00garbage", "cannot be read"),
                                            (_torch_bytes({"format": "something else"}), "is not an autoslim"),
                                            (None, "is not in the artifact store")],
                         ids=["garbage", "foreign", "missing"])
def test_an_unusable_checkpoint_is_one_line_and_the_retry_starts_over(finished_study, capsys, content, reason):
    study_file, journal = finished_study
    study = journal_study(journal, study_file.stem)
    done = study.trials[0]
    store = open_artifact_store(journal)
    if content is not None:
        store.write("checkpoint-bad", io.BytesIO(content))
    study.add_trial(create_trial(state=TrialState.WAITING, params=done.params, distributions=done.distributions,
                                 user_attrs={"checkpoint": {"artifact_id": "checkpoint-bad", "trial": 0, "epoch": 1,
                                                            "phase": "train", "saved_at": "2026-01-01T00:00:00"}},
                                 system_attrs={"failed_trial": 0, "retry_history": [0]}))
    capsys.readouterr()
    assert main(["optimize", str(study_file), "--storage", journal, "--n-trials", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "cannot resume" in line]
    assert len(lines) == 1 and lines[0].startswith("[trial 1] cannot resume: checkpoint checkpoint-bad of trial 0 ")
    assert reason in lines[0] and lines[0].endswith("; starting over")
    retry = journal_study(journal, study_file.stem).trials[1]
    assert retry.state == TrialState.COMPLETE and "resumed_from" not in retry.user_attrs
    assert retry.user_attrs["config"]["seed"] == done.user_attrs["config"]["seed"]


class Killed(BaseException):
    """The worker dies here (SIGKILL runs no handler: nothing after this point happens)."""


def _payload(epoch: int) -> dict:
    return {"format": FORMAT, "phases": [], "current": {"phase": "train", "history": [{"epoch": e} for e in range(epoch)]}}


def _kill_at(step, trial, store):
    """Make the next ``TrialCheckpoints.save`` die at ``step`` (the CI race: a kill right after the attr moved on)."""
    write, set_user_attr = store.write, trial.set_user_attr

    def torn_write(artifact_id, content):
        store.write = write
        write(artifact_id, io.BytesIO(content.read()[:10]))  # half a file on disk
        raise Killed

    def write_then_die(artifact_id, content):
        write(artifact_id, content)
        raise Killed

    def attr_then_die(key, value):
        set_user_attr(key, value)
        if key == "checkpoint":
            raise Killed

    def die_removing(artifact_id):
        raise Killed

    if step == "writing":
        store.write = torn_write
    elif step == "written":
        store.write = write_then_die
    elif step == "pointed":
        trial.set_user_attr = attr_then_die
    else:
        store.remove = die_removing


@pytest.mark.parametrize("step", ["writing", "written", "pointed", "removing"])
def test_a_worker_killed_between_checkpoint_steps_leaves_no_file_its_retry_does_not_remove(tmp_path, step):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    victim = study.ask()
    checkpoints = TrialCheckpoints(victim, store=store)
    checkpoints.save(_payload(1))
    kept = victim.user_attrs["checkpoint"]
    _kill_at(step, victim, store)
    with pytest.raises(Killed):
        checkpoints.save(_payload(2))
    assert len(list(tmp_path.iterdir())) == 2  # the previous checkpoint and the new (maybe torn) one
    attrs = study.trials[0].user_attrs
    resumes_from = 2 if step in ("pointed", "removing") else 1
    assert attrs["checkpoint"]["epoch"] == resumes_from and (resumes_from == 2 or attrs["checkpoint"] == kept)
    study.tell(victim, state=TrialState.FAIL)
    study.enqueue_trial(victim.params, user_attrs=attrs)
    retry = TrialCheckpoints(study.ask(), store=optuna.artifacts.FileSystemArtifactStore(str(tmp_path)))
    assert epochs_in(retry.load()) == resumes_from  # what it points to is whole
    retry.save(_payload(resumes_from + 1))
    assert len(list(tmp_path.iterdir())) == 1  # the predecessor's leftovers went with its latest
    retry.discard()
    assert not any(tmp_path.iterdir())
    assert study.trials[1].user_attrs["checkpoint"] is None and study.trials[1].user_attrs["checkpoint_pending"] is None


def test_a_retry_that_finishes_without_saving_removes_its_predecessors_leftovers(tmp_path):
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    victim = study.ask()
    checkpoints = TrialCheckpoints(victim, store=store)
    checkpoints.save(_payload(1))
    _kill_at("pointed", victim, store)
    with pytest.raises(Killed):
        checkpoints.save(_payload(2))
    study.tell(victim, state=TrialState.FAIL)
    study.enqueue_trial(victim.params, user_attrs=study.trials[0].user_attrs)
    TrialCheckpoints(study.ask(), store=store).discard()  # e.g. the retry's checkpoint did not match: it started over
    assert not any(tmp_path.iterdir())


def test_export_of_a_corrupt_model_file_is_one_line_and_writes_nothing(finished_study, tmp_path, capsys):
    study_file, journal = finished_study
    study = journal_study(journal, study_file.stem)
    (meta,) = [m for m in optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
               if m.filename == "model.pt"]
    (tmp_path / "s-artifacts" / meta.artifact_id).write_bytes(b"not a model")
    size = os.path.getsize(journal)
    assert main(["export", str(study_file), "--storage", journal, "--trial", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: model file:") and "cannot be read" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and os.path.getsize(journal) == size


@pytest.mark.parametrize("argv", [["show"], ["export", "--pareto"], ["report"], ["recover", "--older-than", "1m"]],
                         ids=lambda a: a[0])
def test_an_unknown_study_name_is_one_line_and_changes_nothing(unchanged_study, capsys, argv):
    study_file, journal = unchanged_study
    size = os.path.getsize(journal)
    capsys.readouterr()
    assert main([argv[0], journal, *argv[1:], "--study-name", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: --study-name: no study 'nope'") and err.count("\n") == 1
    assert os.path.getsize(journal) == size


def test_a_checkpoint_of_another_autoslim_version_is_refused_by_name_so_the_trial_starts_over():
    """Format 1 held autoslim's own loop state where format 2 holds a fit's: resuming from it would fail mid-way."""
    buffer = io.BytesIO()
    torch.save({"format": "autoslim-checkpoint-1", "phases": [], "current": None}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError) as e:
        read_checkpoint(buffer, what="checkpoint c")
    assert str(e.value) == ("checkpoint c was written by another autoslim version (format 'autoslim-checkpoint-1'; "
                            "this one reads 'autoslim-checkpoint-2')")
