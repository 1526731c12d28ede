"""``autoslim dashboard``: optuna-dashboard on a study's storage and artifact store.

The study's objectives are named when it is created (``accuracy``, ``params``
and an optional third), so the dashboard labels its plots and columns with
them; each trial shows its note and its artifacts (:mod:`autoslim.artifacts`).
The server binds to 127.0.0.1 unless ``--host`` says otherwise; it has no
authentication, so expose it only on a trusted network.
"""

from __future__ import annotations

from typing import Callable

from autoslim.errors import UsageError
from autoslim.storage import default_artifact_dir, get_storage, open_artifact_store
from autoslim.study import open_study, study_locations


def serve(target: str, *, study_name: str | None = None, storage: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, artifact_store: str | None = None, log: Callable[[str], None] = print) -> None:
    """Serve optuna-dashboard for the study of ``target`` (a study file or storage URL) until interrupted.

    >>> serve("studies/quickstart.yaml", port=8080)  # doctest: +SKIP
    optuna-dashboard for study 'quickstart': http://127.0.0.1:8080/dashboard/studies/1 ...
    """
    from optuna_dashboard import run_server  # heavy: only when serving

    study = open_study(target, study_name=study_name, storage=storage)
    url, location = study_locations(target, storage=storage, artifact_store=artifact_store)
    storage_obj = get_storage(url)
    study_id = storage_obj.get_study_id_from_name(study.study_name)
    store = open_artifact_store(url, location=location)
    folder = location or default_artifact_dir(url)
    log(f"optuna-dashboard for study {study.study_name!r}: http://{host}:{port}/dashboard/studies/{study_id} "
        f"(artifacts: {folder or 'none; pass --artifact-store'}); press Ctrl-C to stop")
    try:
        run_server(storage_obj, host=host, port=port, artifact_store=store)
    except OSError as e:
        raise UsageError(f"--port: cannot listen on {host}:{port}: {e.strerror or e}") from None
