"""One active instance per sync: a lock in the tracking database, held while a process syncs.

PostgreSQL: a session-level advisory lock, ``pg_try_advisory_lock(key)``, taken on a connection
opened for the lock alone and kept until release, so the lock lives exactly as long as that
session. The key is derived from the sync name (:func:`advisory_key`); advisory locks are scoped to
one database, so syncs sharing a tracking database exclude each other by name and nothing else.
The URL must reach PostgreSQL directly or through session pooling: a transaction-pooling proxy
(PgBouncer ``pool_mode=transaction``) hands the session, and the lock, to somebody else.

SQLite: ``flock`` on ``<database file>.<sync name>.lock`` beside the database. The file is never
deleted, because unlinking a lock file lets a waiter lock the old inode while a newcomer locks a
new one; its content (host and pid of the holder) is only there for people and log lines.

How long a dead holder keeps the lock, and so how soon a waiter (polling every ``poll`` seconds,
the daemon's ``min(5 s, interval)``) takes over:

- the holder *process* dies (crash, OOM kill, SIGKILL) on a living host: its kernel closes the
  socket or the file at once, PostgreSQL ends the session and drops the lock immediately, so the
  takeover comes within one poll;
- the holder's *host* dies or is cut off (PostgreSQL only; a SQLite file lives on one host):
  the server notices with its own TCP keepalives on the lock session (:data:`SERVER_TCP`: silent
  for 10 s, then 3 probes 5 s apart, at most 30 s without an answer), so the lock is freed 25-30
  s after the holder was last heard and the takeover comes about one poll later. A cut-off
  holder finds out sooner: its next check (at most 5 s away) goes unanswered and
  :data:`CLIENT_TCP`'s 10 s user timeout fails it, so it stops within 15 s, at least 10 s before
  the server can hand the lock over. That margin, not a fencing token, is what keeps the two from
  pushing together; a page still being pushed after it could overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import structlog
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from cdc_sync.dburls import mask_password
from cdc_sync.errors import CdcSyncError, StateError, first_line

log = structlog.get_logger("cdc_sync.lock")

EX_TEMPFAIL = 75

# libpq settings of the lock connection: the holder learns that its session is unreachable within
# 10 s of an unanswered packet (tcp_user_timeout), before the server gives the lock away.
CLIENT_TCP: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 10,
}

# Server settings of the lock session. The client's keepalives only tell the *client* that the
# server is gone; what frees a dead holder's lock is the server noticing the client is gone.
# idle_session_timeout (PostgreSQL 14+) would end the lock session between checks; it is turned
# off for this session only. Settings the server does not know (older versions) are left out.
SERVER_TCP: dict[str, str] = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "idle_session_timeout": "0",
}


class LockBusy(CdcSyncError):
    """Another instance of this sync holds the lock; try again later (exit 75, EX_TEMPFAIL)."""

    exit_code = EX_TEMPFAIL

    def __init__(self, sync_name: str, where: str, holder: str | None = None) -> None:
        self.sync_name = sync_name
        self.where = where
        self.holder = holder
        held_by = f" (held by {holder})" if holder else ""
        super().__init__(f"another instance of sync {sync_name} holds the lock in {where}{held_by}")


def advisory_key(sync_name: str) -> int:
    """The sync's advisory lock key: a signed 64-bit integer, the same in every process and
    release (Python's ``hash()`` is salted per process, so it would never exclude anyone)."""
    digest = hashlib.blake2b(f"cdc-sync:{sync_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_file_path(database: str, sync_name: str) -> Path:
    """The lock file of a sync whose SQLite tracking database is the file ``database``."""
    if database.startswith("file:"):  # a URI filename (``?uri=true``): drop scheme and options
        database = database.removeprefix("file:").split("?", 1)[0]
    return Path(f"{database}.{sync_name}.lock")


def whoami() -> str:
    """This process, as a holder is shown to those waiting for it."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _Backend(Protocol):
    describe: str

    def try_acquire(self) -> bool: ...

    def still_held(self) -> bool: ...

    def holder(self) -> str | None: ...

    def release(self) -> None: ...


class InstanceLock:
    """The lock that lets one process at a time run the sync ``sync_name``.

    Safe to share between threads (the daemon's watch and its cycle both ask :meth:`still_held`).
    As a context manager it takes the lock without waiting or raises :class:`LockBusy`.
    """

    def __init__(self, engine: Engine, sync_name: str) -> None:
        self.sync_name = sync_name
        self.where = mask_password(engine.url)
        backend = engine.dialect.name
        if backend == "postgresql":
            self._backend: _Backend = _AdvisoryLock(engine.url, sync_name)
        elif backend == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            self._backend = _FileLock(lock_file_path(str(engine.url.database), sync_name))
        else:
            raise StateError(
                f"cannot lock a {backend} tracking database {self.where}",
                "use a PostgreSQL database or a SQLite file",
            )
        self._guard = threading.Lock()
        self._held = False

    @property
    def describe(self) -> str:
        """What is locked: the advisory key or the lock file."""
        return self._backend.describe

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if this object holds it now.

        Raises :class:`StateError` when the tracking database or the lock file cannot be reached.
        """
        with self._guard:
            if self._held:
                return True
            self._held = self._backend.try_acquire()
        if self._held:
            log.info("lock_acquired", sync=self.sync_name, lock=self.describe, holder=whoami())
        return self._held

    def acquire(
        self, stop: threading.Event, poll: float, attempted: Callable[[], None] = lambda: None
    ) -> bool:
        """Wait for the lock, trying every ``poll`` seconds: True once held, False if ``stop`` is
        set first. An attempt that fails (database down) is logged and tried again. Before each
        attempt ``attempted`` is called (the daemon's watchdog: waiting is progress)."""
        waiting = False
        while not stop.is_set():
            attempted()
            try:
                if self.try_acquire():
                    return True
            except StateError as exc:
                log.warning("lock_attempt_failed", sync=self.sync_name, error=exc.problem)
            else:
                if not waiting:
                    log.info(
                        "lock_waiting",
                        sync=self.sync_name,
                        lock=self.describe,
                        holder=self.holder(),
                        poll_s=poll,
                    )
                    waiting = True
            stop.wait(poll)
        return False

    def still_held(self) -> bool:
        """Whether the lock is still ours: False once released, or once its session is gone."""
        with self._guard:
            return self._held and self._backend.still_held()

    def holder(self) -> str | None:
        """Who holds the lock, as far as can be told (None if nobody, or unknown)."""
        with self._guard:
            return self._backend.holder()

    def release(self) -> None:
        """Let the lock go (and close its connection or file); harmless when not held."""
        with self._guard:
            was_held, self._held = self._held, False
            self._backend.release()
        if was_held:
            log.info("lock_released", sync=self.sync_name, lock=self.describe)

    def __enter__(self) -> InstanceLock:
        if not self.try_acquire():
            raise LockBusy(self.sync_name, self.where, self.holder())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


# A bigint advisory lock as pg_locks shows it: classid the high half of the key, objid the low
# half, objsubid 1, in the current database.
_HELD_BY_US = text(
    """
    SELECT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
          AND l.classid::bigint = :high AND l.objid::bigint = :low
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.pid = pg_backend_pid()
    )
    """
)
_HOLDER = text(
    """
    SELECT a.application_name, l.pid, host(a.client_addr)
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND l.classid::bigint = :high AND l.objid::bigint = :low
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid <> pg_backend_pid()
    """
)
# Sets what the server knows of SERVER_TCP for this session (current_setting(..., true) is NULL
# for a setting this server version does not have).
_SESSION_SETTINGS = text(
    """
    SELECT set_config(s.name, s.value, false)
    FROM unnest(CAST(:names AS text[]), CAST(:values AS text[])) AS s(name, value)
    WHERE current_setting(s.name, true) IS NOT NULL
    """
)


class _AdvisoryLock:
    """A session-level advisory lock on a connection of its own (not one of the pool's)."""

    def __init__(self, url: URL, sync_name: str) -> None:
        self.key = advisory_key(sync_name)
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        self._halves = {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF}
        self.describe = f"advisory lock {self.key}"
        # 63 bytes is all PostgreSQL keeps of an application name: the pid goes before the host.
        name = f"cdc-sync lock, {whoami()}"[:63]
        self._engine = create_engine(
            url, poolclass=NullPool, connect_args={**CLIENT_TCP, "application_name": name}
        )
        self._connection: Connection | None = None

    def _connect(self) -> Connection:
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        connection.execute(
            _SESSION_SETTINGS,
            {"names": list(SERVER_TCP), "values": list(SERVER_TCP.values())},
        )
        return connection

    def try_acquire(self) -> bool:
        try:
            if self._connection is None:
                self._connection = self._connect()
            taken = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            ).scalar_one()
        except SQLAlchemyError as exc:
            self.release()
            raise StateError(
                f"cannot take the instance lock in "
                f"{mask_password(self._engine.url)}: "
                f"{first_line(exc)}",
                "check that the tracking database is up and reachable",
            ) from exc
        return bool(taken)

    def still_held(self) -> bool:
        if self._connection is None:
            return False
        try:
            return bool(self._connection.execute(_HELD_BY_US, self._halves).scalar_one())
        except SQLAlchemyError:
            return False

    def holder(self) -> str | None:
        query = _HOLDER
        try:
            if self._connection is None:
                with self._engine.connect() as connection:
                    row = connection.execute(query, self._halves).first()
            else:
                row = self._connection.execute(query, self._halves).first()
        except SQLAlchemyError:
            return None
        if row is None:
            return None
        app, pid, address = row
        return f"{app or 'session'} (server pid {pid}, from {address or 'a local socket'})"

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        # Unlock before closing: the server ends a closed session a moment later, and a waiter
        # asking in that moment would still be refused. If the session is gone, so is the lock.
        with contextlib.suppress(SQLAlchemyError):
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        with contextlib.suppress(SQLAlchemyError):
            connection.close()


class _FileLock:
    """An exclusive ``flock`` on a file: the kernel drops it when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.describe = f"lock file {path}"
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(
                f"cannot open the lock file {self.path}: {exc.strerror}",
                "let the cdc-sync user create files beside the tracking database",
            ) from exc
        try:
            # flock, not fcntl/lockf: flock locks belong to the open file, so two locks in one
            # process exclude each other too, and closing any other fd of the file keeps ours.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot lock {self.path}: {exc.strerror}") from exc
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{whoami()}\n".encode(), 0)
        return True

    def still_held(self) -> bool:
        """Held while our file is open and is still the one at the path (not deleted or
        replaced, which would let another process lock a different file)."""
        if self._fd is None:
            return False
        try:
            ours, there = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)

    def holder(self) -> str | None:
        try:
            content = self.path.read_text().strip()
        except OSError:
            return None
        return content or None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # nobody holds it now; a stale name would mislead
        os.close(fd)
