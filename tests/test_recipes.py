"""The launch recipes of docs/scale-out.md: the Slurm scripts run here (array tasks as local processes, the
proxy job in front of the test PostgreSQL); the Kubernetes manifests parse, and their commands are accepted by
the real command line and point the workers at the proxy's Service."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from worker_helpers import WORKER_STUDY, free_port, postgres_url, wait_all, wait_for_proxy, write_study

from autoslim.cli import build_parser, cmd_optimize, cmd_storage_proxy

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale-out.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def script(name: str) -> str:
    (found,) = [b for b in blocks("bash") if f"# {name}:" in b]
    return found


def test_the_kubernetes_manifests_run_the_real_commands_against_the_proxys_service():
    (text,) = blocks("yaml")
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    assert set(docs) == {"Deployment", "Service", "Job"}
    (proxy,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    command = [a.replace("$(AUTOSLIM_DB)", "postgresql://u:pw@db/x") for a in proxy["command"]]
    assert command[0] == "autoslim" and proxy["env"][0]["name"] == "AUTOSLIM_DB"
    args = build_parser().parse_args(command[1:])
    assert args.func is cmd_storage_proxy and args.host == "0.0.0.0"
    service = docs["Service"]
    assert service["spec"]["selector"] == docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == args.port == proxy["ports"][0]["containerPort"]
    job = docs["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    (worker,) = job["template"]["spec"]["containers"]
    assert worker["command"][0] == "autoslim"
    wargs = build_parser().parse_args(worker["command"][1:])
    assert wargs.func is cmd_optimize
    assert wargs.storage == f"grpc://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert wargs.artifact_store.startswith("s3://")
    mount = worker["volumeMounts"][0]["mountPath"]
    assert wargs.study.startswith(mount + "/")


@pytest.fixture
def shims(tmp_path):
    """``autoslim`` and ``srun`` on PATH as this interpreter's ``python -m autoslim`` and a plain exec."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "autoslim").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m autoslim "$@"\n')
    (folder / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    for f in folder.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def test_the_slurm_array_runs_exactly_n_trials_through_the_proxy_job(tmp_path, shims):
    pg = postgres_url()
    n, port = 6, free_port()
    (tmp_path / "proxy.sbatch").write_text(script("autoslim-proxy.sbatch"))
    (tmp_path / "workers.sbatch").write_text(script("autoslim-workers.sbatch"))
    proxy = subprocess.Popen(["bash", str(tmp_path / "proxy.sbatch")], cwd=tmp_path,
                             env={**shims, "AUTOSLIM_DB": pg, "AUTOSLIM_PROXY_PORT": str(port)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    study = write_study(tmp_path, WORKER_STUDY, n_trials=n)
    try:
        env = {**shims, "AUTOSLIM_PROXY": wait_for_proxy(proxy, port), "AUTOSLIM_ARTIFACTS": str(tmp_path / "art")}
        logs = [tmp_path / f"task{k}.log" for k in range(3)]
        tasks = [subprocess.Popen(["bash", str(tmp_path / "workers.sbatch"), str(study)], cwd=tmp_path,
                                  env={**env, "SLURM_ARRAY_TASK_ID": str(k)}, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for k, log in enumerate(logs)]
        assert wait_all(tasks) == [0, 0, 0], [log.read_text()[-2000:] for log in logs]
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)  # the job's shell and the proxy srun started
        proxy.wait(timeout=30)
    assert all(log.read_text().startswith(f"array task {k} on ") for k, log in enumerate(logs))
    storage = optuna.storages.RDBStorage(pg)
    try:
        trials = optuna.load_study(study_name=study.stem, storage=storage).get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n
    finally:
        optuna.delete_study(study_name=study.stem, storage=storage)
