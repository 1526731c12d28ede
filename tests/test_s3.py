"""Artifacts and checkpoints on object storage: a real S3-compatible server (moto's standalone server) on a free port.

Workers checkpoint to ``s3://bucket/prefix``, one is SIGKILLed mid-trial, another retries its trial and resumes
from the S3 checkpoint; export and the dashboard read the artifacts from S3; nothing is left orphaned there.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from worker_helpers import (SLOW_STUDY, WORKER_STUDY, checkpointed_mid_trial, free_port, start_worker, wait_all,
                            wait_for, write_study)

from autoslim.cli import main

boto3 = pytest.importorskip("boto3") if os.environ.get("CI") != "true" else __import__("boto3")
BUCKET = "autoslim-test"


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free port, the AWS environment pointing at it (workers inherit it), one bucket."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but moto[server] is not installed (pip install -e '.[dev]')")
        pytest.skip("moto[server] is not installed")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def keys(client, prefix: str) -> set[str]:
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


def test_workers_checkpoint_to_s3_a_killed_trial_resumes_and_export_and_dashboard_read_it(tmp_path, s3):
    store = f"s3://{BUCKET}/runs/x"
    study = write_study(tmp_path, SLOW_STUDY, n_trials=2, artifact_store=store)
    journal = str(tmp_path / "s.journal")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [start_worker(study, journal, log=log) for log in logs]
    storage = optuna.storages.JournalStorage(JournalFileBackend(journal))

    def load():
        return optuna.load_study(study_name=study.stem, storage=storage)

    victim = wait_for(load, lambda t: checkpointed_mid_trial(t, last_epoch=3))
    assert f"runs/x/{victim.user_attrs['checkpoint']['artifact_id']}" in keys(s3, "runs/x/")  # in S3, not on disk
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    survivor = [p for p in procs if p.pid != pid]
    assert wait_all(survivor) == [0], [log.read_text()[-2000:] for log in logs]

    trials = load().get_trials(deepcopy=False)
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"]["trial"] == victim.number
    assert retry.user_attrs["resumed_from"]["epoch"] >= victim.user_attrs["checkpoint"]["epoch"] >= 1
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    # nothing orphaned: the bucket holds exactly the completed trials' artifacts and the study's (its shared base
    # network), no checkpoint
    study_artifacts = optuna.artifacts.get_all_artifact_meta(load(), storage=storage)
    assert study_artifacts and all(m.filename.startswith("base-") for m in study_artifacts)
    referenced = {f"runs/x/{m.artifact_id}" for t in trials if t.state == TrialState.COMPLETE
                  for m in optuna.artifacts.get_all_artifact_meta(t, storage=storage)}
    referenced |= {f"runs/x/{m.artifact_id}" for m in study_artifacts}
    assert referenced and keys(s3, "") == referenced
    assert not any((tmp_path / "s-artifacts").glob("*"))  # nothing went to the default folder

    out = tmp_path / "exports"
    assert main(["export", str(study), "--storage", journal, "--trial", str(retry.number), "--out", str(out)]) == 0
    assert (out / f"trial_{retry.number}" / "model.pt").stat().st_size > 0

    meta = optuna.artifacts.get_all_artifact_meta(retry, storage=storage)[0]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "autoslim", "dashboard", str(study), "--storage", journal,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/artifacts/{load()._study_id}/{retry._trial_id}/{meta.artifact_id}"
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert body == s3.get_object(Bucket=BUCKET, Key=f"runs/x/{meta.artifact_id}")["Body"].read()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_missing_bucket_is_one_line_and_writes_nothing(tmp_path, s3, capsys):
    study = write_study(tmp_path, WORKER_STUDY)
    before = sorted(tmp_path.iterdir())
    assert main(["optimize", str(study), "--storage", str(tmp_path / "s.journal"),
                 "--artifact-store", "s3://no-such-bucket/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: --artifact-store: cannot open 's3://no-such-bucket/x': ClientError")
    assert err.count("\n") == 1 and sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("value,line", [("gs://b/x", "is not a folder or an s3:// URL"), ("s3:///x", "names no bucket")])
def test_an_unsupported_artifact_store_is_one_line(tmp_path, capsys, value, line):
    study = write_study(tmp_path, WORKER_STUDY, artifact_store=value)
    assert main(["optimize", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoslim: error: artifact_store: {value!r} {line}") and err.count("\n") == 1
