"""``autoslim dashboard``: optuna-dashboard really renders the study's trials, Pareto front, notes and artifacts.

The browser test loads the pages in headless Chromium. Without Chromium it is
skipped with the reason, except under CI=true, where that is a failure.
"""

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from optuna_dashboard import save_note

from autoslim.storage import open_artifact_store
from autoslim.cli import main
from autoslim.dashboard import serve

FRONT = {0: (0.9, 1000), 1: (0.8, 300), 3: (0.95, 1500)}
POINTS = [FRONT[0], FRONT[1], (0.7, 500), FRONT[3]]


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "headless Chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires the browser test to run")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_study(tmp_path) -> str:
    """A study as autoslim stores it, with a trial note and an artifact; returns its storage URL."""
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    study = optuna.create_study(storage=url, study_name="demo", directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "params"])
    (tmp_path / "note.md").write_text("note")
    for number, (acc, params) in enumerate(POINTS):
        trial = study.ask()
        trial.set_user_attr("method", "trimming")
        if number == 1:  # as a trial of autoslim optimize does
            save_note(trial, "## Trial 1: trimming\n\nThe smallest network.")
            optuna.artifacts.upload_artifact(artifact_store=open_artifact_store(url, create=True),
                                             study_or_trial=trial, file_path=str(tmp_path / "note.md"))
        study.tell(trial, [acc, params])
    study.add_trial(create_trial(state=TrialState.FAIL))
    return url


def start_dashboard(url: str) -> str:
    """Serve the dashboard in a background thread; return its address once it answers."""
    port = free_port()
    threading.Thread(target=serve, args=(url,), kwargs={"port": port, "log": print}, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the dashboard did not start on port {port}")


def browse(chromium: str, url: str, profile, *args: str) -> str:
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", "--window-size=1400,1000", "--hide-scrollbars",
                          "--virtual-time-budget=15000", *args, url], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def text_of(dom: str) -> str:
    dom = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_dashboard_renders_trials_pareto_front_notes_and_artifacts(chromium, tmp_path):
    address = start_dashboard(make_study(tmp_path))
    study_page = f"{address}/dashboard/studies/1"

    dom = browse(chromium, study_page, tmp_path / "profile", "--dump-dom")
    text = text_of(dom)
    assert "Pareto Front" in text and "Objective X: accuracy" in text and "Objective Y: params" in text
    plot = dom[dom.index('id="graph-pareto-front"'):dom.index('id="graph-', dom.index('id="graph-pareto-front"') + 1)]
    assert plot.count('class="point"') >= len(POINTS)  # every completed trial is drawn
    best = text[text.index("Best Trials"):]
    for number, (acc, params) in FRONT.items():
        assert f"Trial {number} Objective Values = [{acc}, {params}]" in best

    trial_page = browse(chromium, f"{study_page}/trials?numbers=1", tmp_path / "profile", "--dump-dom")
    text = text_of(trial_page)
    assert "Trial 1 (trial_id=2)" in text and "The smallest network." in text
    assert "Artifacts" in text and "note.md" in text

    browse(chromium, study_page, tmp_path / "profile", f"--screenshot={tmp_path / 'dashboard.png'}")
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
    print(f"screenshot: {tmp_path / 'dashboard.png'}")


def test_dashboard_of_a_missing_study_is_one_line(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nothing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: study file: ") and err.count("\n") == 1


def test_dashboard_on_a_busy_port_is_one_line(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    optuna.create_study(storage=url, study_name="demo")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["dashboard", url, "--port", str(busy.getsockname()[1])]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after optuna-dashboard's start-up banner
    assert last.startswith("autoslim: error: --port: cannot listen on 127.0.0.1:")
