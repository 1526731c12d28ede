"""Where a study lives: storage URLs, default file locations, password masking, and the locks workers share.

A study's storage is any Optuna storage URL: ``sqlite:///path/x.db`` (one process),
a journal file ``path/x.journal`` (processes of one machine, through an ``fcntl``
lock), an RDB URL such as ``postgresql://user:pw@host/db`` (any number of
machines), or ``grpc://host:port``, Optuna's gRPC proxy in front of an RDB
(hundreds of workers: ``autoslim storage-proxy``). Its artifact store is a folder
or an ``s3://bucket/prefix`` (:func:`open_artifact_store`). Beside a file storage lie its artifact folder (``x-artifacts/``) and
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
import io
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from autoslim.errors import UsageError

JOURNAL_SUFFIXES = (".journal", ".log")
GRPC_TIMEOUT = 10  # seconds to wait for a gRPC storage proxy to answer


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


def grpc_address(url: str) -> tuple[str, int] | None:
    """The host and port of a ``grpc://HOST:PORT`` URL (Optuna's gRPC storage proxy), else None.

    >>> grpc_address("grpc://proxy.internal:13000"), grpc_address("x.journal")
    (('proxy.internal', 13000), None)
    """
    if not url.startswith("grpc://"):
        return None
    host, _, port = url[len("grpc://"):].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--storage: {url!r} is not a gRPC proxy address; accepted: grpc://HOST:PORT")
    return host, int(port)


def get_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``, checked to be reachable; a UsageError line if it is not.

    A journal file is shared by processes through an ``fcntl`` lock; ``grpc://HOST:PORT``
    is Optuna's :class:`~optuna.storages.GrpcStorageProxy` (``autoslim storage-proxy``
    runs the server). Running trials show they are alive by autoslim's own heartbeat on
    every storage (:mod:`autoslim.heartbeat`), so an RDB storage runs without Optuna's.
    """
    try:
        local = storage_file(url)
        if local is not None and not local.parent.is_dir():
            raise UsageError(f"--storage: folder {local.parent} does not exist")
        if is_journal(url):
            return JournalStorage(JournalFileBackend(url, lock_obj=FileLock(f"{url}.flock")))
        address = grpc_address(url)
        if address is not None:
            return _grpc_proxy(*address)
        return optuna.storages.get_storage(url)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--storage: cannot open {redact(url)!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _grpc_proxy(host: str, port: int) -> optuna.storages.BaseStorage:
    try:
        import grpc  # noqa: F401  (Optuna imports it lazily: a missing one would show up only at the first call)
        from optuna.storages import GrpcStorageProxy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proxy = GrpcStorageProxy(host=host, port=port)
    except ImportError as e:
        raise UsageError(f"--storage: {e.name or 'grpcio'} is not installed; pip install 'autoslim[grpc]'") from None
    try:
        proxy.wait_server_ready(timeout=GRPC_TIMEOUT)
    except Exception:
        raise UsageError(f"--storage: cannot open 'grpc://{host}:{port}': no gRPC storage proxy answered within "
                         f"{GRPC_TIMEOUT}s (start one with `autoslim storage-proxy RDB_URL`)") from None
    return proxy


def serve_storage_proxy(url: str, *, host: str = "127.0.0.1", port: int = 13000,
                        log: Callable[[str], None] = print) -> None:
    """Serve the RDB storage ``url`` to workers through Optuna's gRPC proxy until interrupted.

    Workers then use ``--storage grpc://HOST:PORT``: hundreds of them hold one pool of database
    connections (the proxy's) instead of one each.

    >>> serve_storage_proxy("postgresql://autoslim:pw@db/autoslim", host="0.0.0.0", port=13000)  # doctest: +SKIP
    """
    if "://" not in url or url.startswith(("grpc://", "sqlite:///:memory:")):
        raise UsageError(f"storage-proxy: {redact(url)!r} is not an RDB URL; accepted: postgresql://..., "
                         "mysql://... or sqlite:///path.db")
    storage = get_storage(url)
    try:
        import grpc  # noqa: F401
        from optuna.storages import run_grpc_proxy_server
    except ImportError as e:
        raise UsageError(f"storage-proxy: {e.name or 'grpcio'} is not installed; pip install 'autoslim[grpc]'") from None
    log(f"gRPC storage proxy for {redact(url)} on grpc://{host}:{port} (Ctrl-C stops it)")
    run_grpc_proxy_server(storage, host=host, port=port)


def default_artifact_dir(url: str) -> Path | None:
    """The artifact folder beside a file storage (SQLite or journal file), else None."""
    db = storage_file(url)
    return None if db is None else db.with_name(f"{db.stem}-artifacts")


def open_artifact_store(url: str, *, location: str | Path | None = None,
                        create: bool = False) -> ArtifactStore | None:
    """The artifact store of a study in ``url``: ``location`` (a folder or ``s3://bucket[/prefix]``), else the
    default folder beside a file storage; None when there is neither.

    ``create`` makes the folder (for writing). An S3 store is Optuna's
    :class:`~optuna.artifacts.Boto3ArtifactStore` on a boto3 client configured the
    usual AWS way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or ``~/.aws``),
    its artifact ids under ``prefix/``; its bucket must exist and answer, else a
    UsageError line.
    """
    if isinstance(location, str) and location.startswith("s3://"):
        return _s3_store(location)
    folder = Path(location) if location is not None else default_artifact_dir(url)
    if folder is None:
        return None
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


class PrefixedArtifactStore:
    """The artifact store ``store`` with every artifact id under ``prefix`` (the folder of an ``s3://`` URL).

    >>> store = PrefixedArtifactStore(FileSystemArtifactStore(tempfile.mkdtemp()), prefix="")
    >>> store.write("a", io.BytesIO(b"x")); store.open_reader("a").read()
    b'x'
    """

    def __init__(self, store: ArtifactStore, *, prefix: str) -> None:
        self.store, self.prefix = store, prefix

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(self.prefix + artifact_id)


def _s3_store(location: str) -> PrefixedArtifactStore:
    bucket, _, prefix = location[len("s3://"):].partition("/")
    try:
        import boto3
        import botocore.exceptions
    except ImportError as e:
        raise UsageError(f"--artifact-store: {e.name or 'boto3'} is not installed; pip install 'autoslim[s3]'") from None
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise UsageError(f"--artifact-store: cannot open {location!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0]}") from None
    prefix = prefix.strip("/")
    return PrefixedArtifactStore(Boto3ArtifactStore(bucket, client), prefix=f"{prefix}/" if prefix else "")


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
