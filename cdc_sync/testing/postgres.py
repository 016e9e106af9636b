"""Throwaway PostgreSQL servers for tests and benchmarks: a primary, and hot standbys of it.

Each server lives in ``<base_dir>/<name>/``: the data directory ``data/``, the log ``server.log``
and the Unix socket, so nothing escapes the base directory. Servers are tuned for speed, not
durability (``fsync=off`` and friends) and listen on 127.0.0.1 only, with trust authentication.

    with PostgresServer(scratch_dir()) as primary:
        standby = primary.make_standby()
        standby.start()
        primary.execute("CREATE TABLE t (x int)")
        primary.wait_for_replay(standby)

PostgreSQL refuses to run as root, so as root every server program runs as the ``postgres`` OS
user through ``runuser``, and the server's directories belong to that user; :func:`scratch_dir`
makes a base directory that user can reach. Servers still running when Python exits are stopped.

Environment:
    CDC_SYNC_PG_BINDIR  the directory holding ``initdb``, ``pg_ctl`` and ``pg_basebackup``; when
                        set it is used as it is (no fallback), so pointing it at an empty
                        directory is how to rehearse "PostgreSQL is missing".
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from cdc_sync.errors import SetupError

BINDIR_ENV = "CDC_SYNC_PG_BINDIR"
OS_USER = "postgres"

BASE_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",  # a crash loses a throwaway server, nothing else
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "hot_standby": "on",
    "max_connections": "200",
}

PROGRAM_TIMEOUT = 120  # seconds; initdb, pg_ctl -w and pg_basebackup each take a few at most
# --locale=C: the caller's LANG may name a locale this machine lacks.
INITDB_FLAGS = ("-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
# -R: write standby.signal and primary_conninfo; -c fast: checkpoint now rather than wait for one.
BASEBACKUP_FLAGS = ("-R", "-X", "stream", "-c", "fast", "--no-sync")

HBA = """\
local all         all               trust
local replication all               trust
host  all         all  127.0.0.1/32 trust
host  replication all  127.0.0.1/32 trust
"""


class ServerError(SetupError, RuntimeError):
    """A throwaway server could not be set up, started or reached; the message says why."""


def scratch_dir(prefix: str = "cdc-sync-pg-") -> Path:
    """Make a fresh base directory that the ``postgres`` OS user can traverse (0o755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # mkdtemp makes it 0o700, which shuts out the postgres user when we are root
    return path


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _version(bindir: Path) -> list[int]:
    """``/usr/lib/postgresql/15/bin`` → ``[15]``, so that 15 sorts after 9.6."""
    return [int(number) for number in re.findall(r"\d+", bindir.parent.name)]


def _as_root() -> bool:
    return os.geteuid() == 0


def _conf_lines(settings: Mapping[str, str]) -> str:
    """postgresql.conf lines; every value is quoted, which numbers and booleans allow too."""
    quoted = {key: "'" + value.replace("'", "''") + "'" for key, value in settings.items()}
    return "\n# added by cdc_sync.testing\n" + "".join(f"{k} = {v}\n" for k, v in quoted.items())


class PostgresServer:
    """One throwaway PostgreSQL server; as a context manager, inits and starts it, then stops it."""

    def __init__(self, base_dir: Path, *, name: str = "primary", port: int | None = None) -> None:
        self.name = name
        self.port = free_port() if port is None else port
        self.root = Path(base_dir).resolve() / name
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self._bindir: Path | None = None
        self._stop_at_exit = False

    def __repr__(self) -> str:
        return f"PostgresServer(name={self.name!r}, port={self.port}, data_dir={self.data_dir})"

    @classmethod
    def find_bindir(cls) -> Path:
        """Locate the server programs: $CDC_SYNC_PG_BINDIR, pg_config, Debian's layout, PATH."""
        if override := os.environ.get(BINDIR_ENV):
            if (Path(override) / "initdb").is_file():
                return Path(override)
            raise ServerError(
                f"{BINDIR_ENV}={override} holds no initdb",
                f"point {BINDIR_ENV} at the directory holding initdb, or unset it",
            )
        candidates: list[Path] = []
        if pg_config := shutil.which("pg_config"):
            run = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
            if run.returncode == 0 and run.stdout.strip():
                candidates.append(Path(run.stdout.strip()))
        debian = Path("/usr/lib/postgresql").glob("*/bin")
        candidates += sorted(debian, key=_version, reverse=True)
        if initdb := shutil.which("initdb"):
            candidates.append(Path(initdb).resolve().parent)
        for bindir in candidates:
            if (bindir / "initdb").is_file():
                return bindir
        raise ServerError(
            "PostgreSQL server programs (initdb, pg_ctl) not found",
            "apt-get install postgresql, or set CDC_SYNC_PG_BINDIR to their directory",
        )

    def init(self, *, settings: Mapping[str, str] | None = None) -> None:
        """Create the cluster with initdb and configure it as a fast, loopback-only primary."""
        self._make_root()
        self._run("initdb", "-D", str(self.data_dir), *INITDB_FLAGS)
        self._configure({**BASE_SETTINGS, **(settings or {})})
        (self.data_dir / "pg_hba.conf").write_text(HBA)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if not self._stop_at_exit:
            atexit.register(self.stop)  # the safety net for a session that dies mid-test
            self._stop_at_exit = True
        try:
            self._pg_ctl("-l", str(self.log_file), "-w", "-t", "60", "start")
        except ServerError as error:
            self.stop()  # pg_ctl may have given up waiting on a server that is still coming up
            raise ServerError(f"{self.name} did not start: {error}\n{self._log_tail()}") from None

    def stop(self) -> None:
        """Stop the server (fast shutdown); stopping a stopped server does nothing."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        if self._pg_ctl("status", check=False).returncode == 0:  # 3: a stale pid file
            self._pg_ctl("-m", "fast", "-w", "stop")

    def make_standby(
        self,
        base_dir: Path | None = None,
        *,
        name: str = "standby",
        settings: Mapping[str, str] | None = None,
    ) -> PostgresServer:
        """Clone this running primary with pg_basebackup into an un-started hot standby."""
        standby = PostgresServer(base_dir or self.root.parent, name=name)
        standby._make_root()
        source = ("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres")
        standby._run("pg_basebackup", *source, "-D", str(standby.data_dir), *BASEBACKUP_FLAGS)
        standby._configure(dict(settings or {}))  # the copied conf still names our port and socket
        return standby

    def url(self, dbname: str = "postgres", *, user: str = "postgres") -> str:
        """The SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq conninfo string of a database on this server, for ``psycopg.connect``."""
        return make_conninfo(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=10
        )

    def create_database(self, name: str) -> None:
        """Create an empty database."""
        self._execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, ending the sessions still connected to it."""
        drop = pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self._execute(drop.format(pgsql.Identifier(name)))

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Run SQL in autocommit mode; the text is the caller's own, never outside input."""
        self._execute(pgsql.SQL(sql), dbname)

    def wait_for_replay(self, standby: PostgresServer, timeout: float = 30) -> None:
        """Block until ``standby`` has replayed everything this primary has written so far."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            # With synchronous_commit=off the last commits may sit unflushed, where no standby
            # can see them and pg_current_wal_lsn() does not count them yet. One synchronous
            # commit that wrote WAL flushes everything before it; a transactional message is the
            # smallest such commit.
            conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, 'cdc_sync.testing', 'fence')")
            [(target,)] = conn.execute("SELECT pg_current_wal_lsn()::text").fetchall()
        deadline = time.monotonic() + timeout
        query = "SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)"
        with psycopg.connect(standby.dsn(), autocommit=True) as conn:
            while not (row := conn.execute(query, [target]).fetchone()) or not row[0]:
                if time.monotonic() > deadline:
                    raise ServerError(f"{standby.name} did not replay {target} in {timeout}s")
                time.sleep(0.01)  # a readiness poll: replay usually lands within milliseconds

    def __enter__(self) -> PostgresServer:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _execute(self, statement: pgsql.SQL | pgsql.Composed, dbname: str = "postgres") -> None:
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def _make_root(self) -> None:
        """Create ``<base_dir>/<name>`` (0o700), owned by the user the server will run as."""
        self.root.mkdir(mode=0o700, parents=True)
        if _as_root():
            owner = pwd.getpwnam(OS_USER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            for parent in self.root.parents:
                if parent.stat().st_mode & 0o001 == 0:
                    raise ServerError(
                        f"the {OS_USER} user cannot enter {parent}",
                        "put servers under a base dir from cdc_sync.testing.postgres.scratch_dir()",
                    )

    def _configure(self, settings: Mapping[str, str]) -> None:
        own = {"port": str(self.port), "unix_socket_directories": str(self.root)}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(_conf_lines({**own, **settings}))  # later lines win in postgresql.conf

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data_dir), *args, check=check)

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program, as the postgres user when we are root."""
        if self._bindir is None:
            self._bindir = self.find_bindir()
        command = [str(self._bindir / program), *args]
        if _as_root():
            command = ["runuser", "-u", OS_USER, "--", *command]
        try:
            done = subprocess.run(
                command, cwd=self.root, capture_output=True, text=True, timeout=PROGRAM_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"{program} still running after {PROGRAM_TIMEOUT}s") from None
        if check and done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise ServerError(f"{program} exited with {done.returncode}: {output}")
        return done

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
