"""Several worker processes on one study (journal file here; PostgreSQL where AUTOSLIM_TEST_POSTGRES_URL is set).

Each worker is a real ``python -m autoslim optimize`` process; the study must end with
exactly ``n_trials`` finished trials, none lost, none run twice. A worker killed with
SIGKILL mid-trial is survived: its trial is retried after the heartbeat grace period
and resumes from its last epoch checkpoint.
"""

import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from worker_helpers import (SLOW_STUDY, WORKER_STUDY, checkpointed_mid_trial, finished_snapshot, postgres_url,
                            start_worker, trained_epochs, wait_all, wait_for, write_study)

from autoslim.cli import main


@pytest.fixture
def pg(tmp_path):
    """The test server's URL; the studies a test made there are deleted afterwards."""
    url = postgres_url()
    yield url
    storage = optuna.storages.RDBStorage(url)
    for s in optuna.get_all_study_summaries(storage):
        if s.study_name in {p.stem for p in tmp_path.glob("*.yaml")}:
            optuna.delete_study(study_name=s.study_name, storage=storage)


def check_exactly_n(study: optuna.Study, n: int, logs: list[str]) -> None:
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == n
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state) for t in trials]
    assert sorted(t.number for t in trials) == list(range(n))
    seeds = [t.user_attrs["config"]["seed"] for t in trials]
    assert len(set(seeds)) == n  # no trial ran twice
    text = "\n".join(logs)
    assert "database is locked" not in text and "Traceback" not in text
    # every trial's progress was printed by exactly one worker
    for t in trials:
        assert sum(f"[trial {t.number}] done in" in log for log in logs) == 1


def run_workers(tmp_path: Path, study: Path, storage: str, n: int, *args: str) -> list[str]:
    logs = [tmp_path / f"worker{i}.log" for i in range(n)]
    procs = [start_worker(study, storage, *args, log=log) for log in logs]
    assert wait_all(procs) == [0] * n, [log.read_text()[-2000:] for log in logs]
    return [log.read_text() for log in logs]


def test_four_workers_on_a_journal_file_finish_exactly_n_trials(tmp_path):
    study = write_study(tmp_path, WORKER_STUDY)
    journal = str(tmp_path / "study.journal")
    logs = run_workers(tmp_path, study, journal, 4)
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))
    check_exactly_n(optuna.load_study(study_name=study.stem, storage=storage), WORKER_STUDY["n_trials"], logs)


def test_four_workers_on_postgresql_finish_exactly_n_trials(tmp_path, pg):
    study = write_study(tmp_path, WORKER_STUDY)
    logs = run_workers(tmp_path, study, pg, 4)
    check_exactly_n(optuna.load_study(study_name=study.stem, storage=pg), WORKER_STUDY["n_trials"], logs)


def test_a_worker_killed_mid_trial_on_postgresql_is_retried_and_resumes(tmp_path, pg):
    n = 4
    study = write_study(tmp_path, SLOW_STUDY, n_trials=n)
    artifacts = tmp_path / "artifacts"
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [start_worker(study, pg, "--artifact-dir", str(artifacts), log=log) for log in logs]
    storage = optuna.storages.RDBStorage(pg)

    def load():
        return optuna.load_study(study_name=study.stem, storage=storage)

    victim = wait_for(load, lambda t: checkpointed_mid_trial(t, last_epoch=3))
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    before = finished_snapshot(load())
    survivors = [p for p in procs if p.pid != pid]
    assert wait_all(survivors) == [0, 0]
    assert next(p for p in procs if p.pid == pid).wait() == -signal.SIGKILL

    after = load()
    trials = after.get_trials(deepcopy=False)
    assert {k: v for k, v in finished_snapshot(after).items() if k in before} == before  # untouched
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert [t.state for t in trials].count(TrialState.COMPLETE) == n
    resumed = retry.user_attrs["resumed_from"]
    assert resumed["trial"] == victim.number and resumed["epoch"] >= victim.user_attrs["checkpoint"]["epoch"] >= 1
    text = "\n".join(log.read_text() for log in logs)
    epochs = trained_epochs(text, retry.number)
    assert epochs and min(epochs) == resumed["epoch"] + 1 > 1  # the retry did not start over
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [1, 2, 3, 4, 5]
    assert retry.user_attrs["config"]["seed"] == victim.user_attrs["config"]["seed"]
    assert retry.user_attrs["checkpoint"] is None and retry.user_attrs["checkpoint_pending"] is None
    assert not any(artifacts.glob("checkpoint-*"))  # the victim's replaced or half-written files too
    assert "database is locked" not in text


UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"


@pytest.mark.parametrize("argv", [["optimize", "{study}"], ["show", "{study}"], ["export", "{study}", "--pareto"],
                                  ["report", "{study}"], ["recover", "{study}", "--older-than", "1m"],
                                  ["dashboard", "{study}"]],
                         ids=lambda a: a[0])
def test_every_command_given_an_unreachable_storage_says_so_on_one_line(tmp_path, capsys, argv):
    study = write_study(tmp_path, WORKER_STUDY)
    before = sorted(tmp_path.iterdir())
    assert main([a.format(study=study) for a in argv] + ["--storage", UNREACHABLE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: --storage: cannot open") and err.count("\n") == 1, err
    assert "127.0.0.1:1" in err and sorted(tmp_path.iterdir()) == before
