"""Where a study lives: storage URLs, default file locations, password masking, and the locks workers share.

A study's storage is any Optuna storage URL: ``sqlite:///path/x.db`` (one process),
a journal file ``path/x.journal`` (processes of one machine, through an ``fcntl``
lock), or an RDB URL such as ``postgresql://user:pw@host/db`` (any number of
machines). Beside a file storage lie its artifact folder (``x-artifacts/``) and
its study lock (``x.db.autoslim-lock``). Everything here is shared by the
modules that open studies, read data, recover trials and store artifacts.

>>> storage_file("sqlite:///runs/x.db"), storage_file("runs/x.journal"), storage_file("postgresql://db/x")
(PosixPath('runs/x.db'), PosixPath('runs/x.journal'), None)
>>> default_artifact_dir("sqlite:////runs/quickstart.db")
PosixPath('/runs/quickstart-artifacts')
>>> redact("postgresql://autoslim:secret@db/autoslim")
'postgresql://autoslim:***@db/autoslim'
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autoslim.config import RecoveryConfig
from autoslim.errors import UsageError

JOURNAL_SUFFIXES = (".journal", ".log")


def is_journal(url: str) -> bool:
    """Whether ``url`` names a journal file (a path ending in .journal or .log, no scheme)."""
    return "://" not in url and url.endswith(JOURNAL_SUFFIXES)


def storage_file(url: str) -> Path | None:
    """The local file of a SQLite URL or journal path, else None."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):])
    return Path(url) if is_journal(url) else None


def redact(url: str) -> str:
    """A storage URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def get_storage(url: str, *, recovery: RecoveryConfig | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``, checked to be reachable; a UsageError line if it is not.

    A journal file is shared by processes through an ``fcntl`` lock; with
    ``recovery``, an RDB storage runs trials with a heartbeat and retries the
    trials of dead workers (:mod:`autoslim.checkpoint` resumes them).
    """
    try:
        local = storage_file(url)
        if local is not None and not local.parent.is_dir():
            raise UsageError(f"--storage: folder {local.parent} does not exist")
        if is_journal(url):
            return JournalStorage(JournalFileBackend(url, lock_obj=FileLock(f"{url}.flock")))
        if recovery is not None and url != "sqlite:///:memory:":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=recovery.heartbeat_interval, grace_period=recovery.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=recovery.max_retry, inherit_intermediate_values=True))
        return optuna.storages.get_storage(url)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--storage: cannot open {redact(url)!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def default_artifact_dir(url: str) -> Path | None:
    """The artifact folder beside a file storage (SQLite or journal file), else None."""
    db = storage_file(url)
    return None if db is None else db.with_name(f"{db.stem}-artifacts")


def open_artifact_store(url: str, *, artifact_dir: str | Path | None = None,
                        create: bool = False) -> FileSystemArtifactStore | None:
    """The artifact store of a study in ``url`` (``artifact_dir`` overrides the default folder).

    None when there is no folder for it. ``create`` makes the folder (for writing).
    """
    folder = Path(artifact_dir) if artifact_dir is not None else default_artifact_dir(url)
    if folder is None:
        return None
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


class FileLock:
    """An exclusive ``fcntl.flock`` on ``path`` between threads and processes of one machine.

    The kernel drops it when its process dies, so it also serves as the lock
    of a journal file shared by worker processes.

    >>> lock = FileLock(f"{tempfile.mkdtemp()}/x.lock")
    >>> with lock:
    ...     pass
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._threads = threading.Lock()
        self._fd: int | None = None

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._threads.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Release the lock; a no-op if it is not held (a started trial released it early)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._threads.release()

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock named ``name``, held on a connection of its own.

    >>> with AdvisoryLock("postgresql://autoslim@localhost/autoslim", name="autoslim study lock"):  # doctest: +SKIP
    ...     pass
    """

    def __init__(self, url: str, *, name: str) -> None:
        import sqlalchemy

        self._sql = sqlalchemy
        self._engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        self._key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        self._conn = None

    def acquire(self) -> bool:
        try:
            conn = self._engine.connect()
        except self._sql.exc.SQLAlchemyError as e:
            cause = getattr(e, "orig", None) or e
            raise UsageError(f"--storage: cannot open {self._engine.url.render_as_string(hide_password=True)!r}: "
                             f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}") from None
        try:
            conn.execute(self._sql.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
            conn.commit()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return True

    def release(self) -> None:
        """Release the lock; a no-op if it is not held."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.execute(self._sql.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            conn.commit()
        finally:
            conn.close()

    def __enter__(self) -> "AdvisoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def study_lock(url: str) -> FileLock | AdvisoryLock:
    """The lock that all workers on the storage ``url`` share (one for all its studies, so it also covers
    creating the storage's tables); a UsageError line if it cannot be had.

    >>> study_lock(f"{tempfile.mkdtemp()}/x.journal").path.endswith("x.journal.autoslim-lock")
    True
    """
    if url.startswith(("postgresql", "postgres://")):
        try:
            return AdvisoryLock(url, name="autoslim study lock")
        except ImportError as e:
            raise UsageError(f"--storage: {e.name or 'a driver'} is not installed; "
                             "pip install 'autoslim[postgres]'") from None
    local = storage_file(url)
    if local is not None:
        if not local.parent.is_dir():
            raise UsageError(f"--storage: folder {local.parent} does not exist")
        return FileLock(f"{local}.autoslim-lock")
    digest = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    return FileLock(Path(tempfile.gettempdir()) / f"autoslim-{digest}.lock")
