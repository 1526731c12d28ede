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
                            start_worker, storage_proxy, trained_epochs, wait_all, wait_for, write_study)

from autoslim.cli import main
from autoslim.distributed import run_worker
from autoslim.recover import DUPLICATE_KEY, enqueue, requeue, take_waiting, top_up


@pytest.fixture
def pg(tmp_path):
    """The test server's URL; the studies a test made there are deleted afterwards."""
    url = postgres_url()
    yield url
    storage = optuna.storages.RDBStorage(url)
    for s in optuna.get_all_study_summaries(storage):
        if s.study_name in {p.stem for p in tmp_path.glob("*.yaml")}:
            optuna.delete_study(study_name=s.study_name, storage=storage)


@pytest.fixture(params=["postgresql", "grpc proxy"])
def shared(request, pg, tmp_path):
    """What the workers are given: the PostgreSQL URL, or a gRPC proxy in front of it (tests read the database)."""
    if request.param == "postgresql":
        yield pg
    else:
        with storage_proxy(pg, log=tmp_path / "proxy.log") as url:
            yield url


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


def test_four_workers_on_postgresql_finish_exactly_n_trials(tmp_path, pg, shared):
    study = write_study(tmp_path, WORKER_STUDY)
    logs = run_workers(tmp_path, study, shared, 4)
    check_exactly_n(optuna.load_study(study_name=study.stem, storage=pg), WORKER_STUDY["n_trials"], logs)


def test_a_worker_killed_mid_trial_on_postgresql_is_retried_and_resumes(tmp_path, pg, shared):
    n = 4
    study = write_study(tmp_path, SLOW_STUDY, n_trials=n)
    artifacts = tmp_path / "artifacts"
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [start_worker(study, shared, "--artifact-dir", str(artifacts), log=log) for log in logs]
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
    # the study's base trained once (3 epochs, outside the trials), then the trial's 5 retrain epochs
    assert [r["epoch"] for r in retry.user_attrs["history"]] == [1, 2, 3, 4, 5]
    assert retry.user_attrs["config"]["seed"] == victim.user_attrs["config"]["seed"]
    assert retry.user_attrs["checkpoint"] is None and retry.user_attrs["checkpoint_pending"] is None
    assert not any(artifacts.glob("checkpoint-*"))  # the victim's replaced or half-written files too
    assert "database is locked" not in text


def tiny_study(n: int) -> optuna.Study:
    study = optuna.create_study()
    top_up(study, n)
    return study


def test_two_workers_topping_up_at_once_still_run_exactly_n_trials():
    study, ran = tiny_study(3), []
    assert top_up(study, 3) == []  # every slot is filled
    dup = enqueue(study, slot=1)  # what a second worker's top-up, racing the first, queues
    run_worker(study, lambda t: ran.append(t.number) or t.suggest_float("x", 0, 1), n_trials=3, stale_after=60,
               log=lambda s: None)
    trials = study.get_trials(deepcopy=False)
    assert sorted(ran) == [0, 1, 2] and dup.number not in ran  # the duplicate never ran
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    assert trials[3].system_attrs[DUPLICATE_KEY] is True


def test_a_duplicate_with_the_lower_id_wins_its_slot_whichever_is_taken_first():
    study = optuna.create_study()
    first, second = enqueue(study, slot=0), enqueue(study, slot=0)
    study._storage.set_trial_state_values(second._trial_id, state=TrialState.RUNNING)  # another worker took it
    assert take_waiting(study, n_trials=1, log=lambda s: None).number == first.number


def test_two_processes_failing_the_same_stale_trial_queue_one_retry():
    study, lines = tiny_study(1), []
    running = take_waiting(study, n_trials=1)
    first = requeue(study, running, log=lines.append)
    second = requeue(study, running, log=lines.append)  # saw it RUNNING too; its state change is refused
    assert first is not None and second is None
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.FAIL, TrialState.WAITING]
    assert lines[1] == "trial 0: finished meanwhile; left as it is"


def test_a_trial_that_raises_passes_its_slot_to_a_fresh_trial():
    study, calls = tiny_study(2), []

    def objective(trial):
        calls.append(trial.number)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return trial.suggest_float("x", 0, 1)

    run_worker(study, objective, n_trials=2, stale_after=60, log=lambda s: None)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[2].system_attrs["autoslim:slot"] == study.trials[0].system_attrs["autoslim:slot"]


def test_a_worker_fails_and_retries_a_silent_trial_on_any_storage(tmp_path):
    journal = str(tmp_path / "s.journal")
    study = optuna.create_study(storage=optuna.storages.JournalStorage(JournalFileBackend(journal)))
    top_up(study, 1)
    take_waiting(study, n_trials=1)  # a worker took it and died: no heartbeat, ever
    lines = []
    run_worker(study, lambda t: t.suggest_float("x", 0, 1), n_trials=1, stale_after=0.5, poll=0.1, log=lines.append)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0
    assert any(line.startswith("trial 0: failed; retry queued as trial 1") for line in lines), lines


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


def test_an_unreachable_grpc_proxy_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("autoslim.storage.GRPC_TIMEOUT", 1)
    study = write_study(tmp_path, WORKER_STUDY)
    before = sorted(tmp_path.iterdir())
    assert main(["optimize", str(study), "--storage", "grpc://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err == ("autoslim: error: --storage: cannot open 'grpc://127.0.0.1:1': no gRPC storage proxy answered "
                   "within 1s (start one with `autoslim storage-proxy RDB_URL`)\n")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:1", "x.journal", "sqlite:///:memory:"])
def test_the_storage_proxy_refuses_what_is_not_an_rdb_url_in_one_line(tmp_path, capsys, url):
    assert main(["storage-proxy", url]) == 2
    err = capsys.readouterr().err
    assert err == (f"autoslim: error: storage-proxy: {url!r} is not an RDB URL; accepted: postgresql://..., "
                   "mysql://... or sqlite:///path.db\n")
    assert not any(tmp_path.iterdir())
