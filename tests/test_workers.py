"""``autoslim optimize --workers N``: N local worker processes, one view of their progress, Ctrl-C for all."""

import re
import signal

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from worker_helpers import SLOW_STUDY, WORKER_STUDY, checkpointed_mid_trial, start_worker, wait_all, wait_for, write_study

from autoslim.cli import main
from autoslim.errors import UsageError
from autoslim.workers import parse_devices, worker_command


def journal(path: str) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def test_two_workers_finish_exactly_n_trials_in_one_view(tmp_path):
    study, storage = write_study(tmp_path, WORKER_STUDY, n_trials=4), str(tmp_path / "s.journal")
    log = tmp_path / "parent.log"
    (code,) = wait_all([start_worker(study, storage, "--workers", "2", "--devices", "cpu", log=log)])
    text = log.read_text()
    assert code == 0, text[-3000:]
    trials = optuna.load_study(study_name=study.stem, storage=journal(storage)).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # two processes ran them
    lines = text.splitlines()
    assert all(re.match(r"\[(w[01]|all)\] ", line) for line in lines), [l for l in lines if not l.startswith("[")]
    for t in trials:  # every trial's lines come from the one worker that ran it
        prefixes = {line.split()[0] for line in lines if f"[trial {t.number}]" in line}
        assert len(prefixes) == 1, prefixes
    summaries = [line for line in lines if line.startswith("[all] ") and "finished in this run" in line]
    assert summaries[-1].startswith("[all] 4 trial(s) finished in this run by 2 workers: 4 completed")
    assert [int(s.split()[1]) for s in summaries[:4]] == [1, 2, 3, 4]
    assert "1 thread(s)" in text  # 2 cores (or 1) shared by 2 workers


def test_ctrl_c_stops_every_worker_and_requeues_their_trials(tmp_path):
    # a window of 8 epochs to interrupt in: each trial trains its own base (share: false), checkpointed every epoch
    # (a shared base leaves the trials only their 2 retrain epochs, and the interrupt could come after the last)
    longer = {**SLOW_STUDY, "train": {**SLOW_STUDY["train"], "epochs": 6}, "base": {"share": False}}
    study, storage = write_study(tmp_path, longer, n_trials=2), str(tmp_path / "s.journal")
    parent = start_worker(study, storage, "--workers", "2", "--devices", "cpu",
                          "--artifact-dir", str(tmp_path / "a"), log=tmp_path / "parent.log")
    store = journal(storage)
    wait_for(lambda: optuna.load_study(study_name=study.stem, storage=store),
             lambda t: checkpointed_mid_trial(t, last_epoch=8), timeout=300)
    parent.send_signal(signal.SIGINT)
    assert parent.wait(timeout=90) == 130
    text = (tmp_path / "parent.log").read_text()
    trials = optuna.load_study(study_name=study.stem, storage=journal(storage)).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], text[-3000:]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and len(re.findall(r"\[w[01]\] trial \d+: failed; retry queued", text)) == len(failed)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting if "failed_trial" in t.system_attrs) == \
        sorted(t.number for t in failed)
    assert main(["optimize", str(study), "--storage", storage, "--artifact-dir", str(tmp_path / "a")]) == 0
    trials = optuna.load_study(study_name=study.stem, storage=journal(storage)).get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert any(t.user_attrs.get("resumed_from") for t in trials if t.state == TrialState.COMPLETE)


@pytest.mark.parametrize("args,line", [
    (["--workers", "2"], "--workers: 2 processes cannot share the SQLite storage"),
    (["--workers", "2", "--storage", "x.journal", "--devices", "gpu0"], "--devices: 'gpu0' is not a device"),
    (["--workers", "2", "--storage", "x.journal", "--devices", "cuda:7"], "--devices: cuda:7 is not visible here"),
    (["--devices", "cpu"], "--devices: only with --workers N"),
    (["--workers", "0", "--storage", "x.journal"], "--workers: must be at least 1")])
def test_bad_worker_flags_are_one_line_and_write_nothing(tmp_path, capsys, args, line):
    study = write_study(tmp_path, WORKER_STUDY)
    before = sorted(tmp_path.iterdir())
    assert main(["optimize", str(study), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoslim: error: {line}") and err.count("\n") == 1, err
    assert sorted(tmp_path.iterdir()) == before


def test_each_gpu_worker_sees_only_its_gpu():
    assert parse_devices("auto", workers=4, gpus=2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_command(["s.yaml"], "cuda:1") == (["s.yaml", "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": "1"})
    assert worker_command(["s.yaml"], "cpu") == (["s.yaml", "--device", "cpu"], {})
    with pytest.raises(UsageError, match="visible GPUs: none"):
        parse_devices("cuda:0", workers=1, gpus=0)
