"""The torture test: a real daemon on a hot standby while the primary is written hard.

For tens of seconds several writers change the primary: contact updates, updates of columns that
are not synced, inserts, batches of rows sharing one ``updated_at``, and long transactions that
commit rows stamped with their (old) start time. Meanwhile ``cdc-sync run`` reads the standby,
EngageLab (the emulator) answers with 503 pages, code -1 and dropped connections, and the daemon
is killed with SIGKILL once and started again. At the end EngageLab must hold exactly the
primary's final contacts, and the users whose only changes were to unsynced columns must not
have caused a single extra API call.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, inspect
from userdb import UserDb, write_config

from cdc_sync.emulator import Emulator, EmulatorServer, Faults
from cdc_sync.testing.postgres import PostgresServer

USERS = 300  # users 1..300 get contact changes
QUIET = range(301, 351)  # users whose synced columns never change; only their name does
TORTURE_SECONDS = float(os.environ.get("CDC_SYNC_TORTURE_SECONDS", "20"))
PACE = 0.01  # seconds between one writer's transactions: a busy application, not a bulk load
FAULTS = Faults(latency=0.002, error_rate=0.04, server_error_rate=0.04, drop_rate=0.03, seed=7)


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll until ``condition`` holds (readiness, never a stand-in for correctness)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def holding(emulator: Emulator) -> dict[int, dict[str, str]]:
    """What EngageLab holds, leaving out users it holds nothing for (every contact cleared)."""
    return {euid: contacts for euid, contacts in emulator.contacts.items() if contacts}


def contact_value(column: str, rng: random.Random) -> str:
    """A fresh value for a contact column, shaped as the emulator requires: an address for the
    email column, digits for the phone columns."""
    if column == "email":
        return f"u{rng.getrandbits(40):x}@example.com"
    return f"+8190{rng.randrange(10**8):08d}"


class Writers:
    """Threads that write the primary the way a busy application would, until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.counts = {"contact": 0, "unrelated": 0, "insert": 0, "batch": 0, "long": 0}
        self._next_id = 10_000
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(work, seed), daemon=True)
            for seed, work in enumerate(
                [
                    self.contact,
                    self.contact,
                    self.unrelated,
                    self.insert,
                    self.batch,
                    self.long,
                    self.long,
                ]
            )
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()
        assert not self.errors, self.errors

    def _loop(self, work: Callable[[psycopg.Connection, random.Random], str], seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(self.dsn) as connection:
                while not self.stop.wait(PACE):
                    try:
                        kind = work(connection, rng)
                        connection.commit()
                        with self._lock:
                            self.counts[kind] += 1
                    except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                        connection.rollback()  # the application would retry; the test needn't
        except BaseException as exc:
            self.errors.append(exc)

    def contact(self, c: psycopg.Connection, rng: random.Random) -> str:
        user = rng.randint(1, USERS)
        column = rng.choice(["email", "mobile", "landline", "whatsapp"])
        value = None if rng.random() < 0.1 else contact_value(column, rng)
        c.execute(
            f"UPDATE users SET {column} = %s, updated_at = now() WHERE id = %s",  # noqa: S608
            (value, user),
        )
        return "contact"

    def unrelated(self, c: psycopg.Connection, rng: random.Random) -> str:
        user = rng.choice([*QUIET, rng.randint(1, USERS)])
        c.execute(
            "UPDATE users SET name = %s, updated_at = now() WHERE id = %s",
            (f"name-{rng.getrandbits(32):x}", user),
        )
        return "unrelated"

    def insert(self, c: psycopg.Connection, rng: random.Random) -> str:
        with self._lock:
            self._next_id += 1
            user = self._next_id
        c.execute(
            "INSERT INTO users (id, name, email, engagelab_euid) VALUES (%s, %s, %s, %s)",
            (user, "new", f"new{user}@example.com", 1000 + user),
        )
        return "insert"

    def batch(self, c: psycopg.Connection, rng: random.Random) -> str:
        """Thirty users changed in one transaction: they share one updated_at."""
        users = sorted(rng.sample(range(1, USERS + 1), 30))
        for user in users:
            c.execute(
                "UPDATE users SET email = %s, updated_at = now() WHERE id = %s",
                (contact_value("email", rng), user),
            )
        time.sleep(0.05)
        return "batch"

    def long(self, c: psycopg.Connection, rng: random.Random) -> str:
        """A transaction that stays open for seconds, so its rows commit stamped in the past."""
        for user in rng.sample(range(1, USERS + 1), 3):
            c.execute(
                "UPDATE users SET mobile = %s, updated_at = now() WHERE id = %s",
                (contact_value("mobile", rng), user),
            )
        self.stop.wait(rng.uniform(1.5, 3.0))
        return "long"


class Daemon:
    """``cdc-sync run`` as a real process, logging to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cdc_sync.cli", "-c", str(self.config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def signal(self, signum: int) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def kill_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[[Path, Path], Daemon]]:
    made: list[Daemon] = []

    def make(config: Path, log: Path) -> Daemon:
        made.append(daemon := Daemon(config, log))
        return daemon

    yield make
    for daemon in made:
        daemon.kill_if_running()


@pytest.mark.parametrize("mode", ["timestamp", "xid8"])
def test_nothing_lost_nothing_stale_under_torture(
    mode: str,
    standby_pair: tuple[PostgresServer, PostgresServer],
    tmp_path: Path,
    daemon_factory: Callable[[Path, Path], Daemon],
) -> None:
    """After writers, faults and a SIGKILL, EngageLab holds exactly the primary's final contacts,
    and changes to unsynced columns made no API call."""
    primary, standby = standby_pair
    database = f"torture_{mode}"
    primary.create_database(database)
    users = UserDb(primary.url(database), xid8=mode == "xid8")
    users.add_users(range(1, USERS + 1), mobile="+819000000000")
    users.add_users(QUIET)
    primary.wait_for_replay(standby)
    emulator = Emulator("key", "secret", faults=FAULTS)
    with EmulatorServer(emulator) as server:
        config = write_config(
            tmp_path / "config.yaml",
            source_url=standby.url(database),
            state_url=f"sqlite:///{tmp_path}/state.db",
            api_url=server.url,
            source={
                "cursor": "cdc_xid" if mode == "xid8" else "updated_at",
                "cursor_mode": mode,
                "lookback": "30s",
                "batch_size": 50,
            },
            engagelab={"concurrency": 8, "timeout": "2s", "clear_empty": True},
            retry={"base": "1s", "max": "2s", "max_attempts": 1000},
            logging={"level": "INFO", "format": "console"},
        )
        migrated = subprocess.run(
            [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), "migrate"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        log = tmp_path / "daemon.log"
        daemon = daemon_factory(config, log)
        daemon.start()

        def in_step() -> bool:
            return holding(emulator) == users.expected_contacts()

        wait_for(in_step, "the initial sync", timeout=120)
        writers = Writers(primary.dsn(database))
        writers.start()
        time.sleep(TORTURE_SECONDS / 2)  # the workload's length, not a wait for a result
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        daemon.start()
        time.sleep(TORTURE_SECONDS / 2)
        writers.finish()
        primary.wait_for_replay(standby)
        try:
            wait_for(in_step, "EngageLab to match the primary", timeout=180)
        except AssertionError:
            expected, held = users.expected_contacts(), holding(emulator)
            wrong = {
                e: (expected.get(e), held.get(e))
                for e in expected.keys() | held.keys()
                if expected.get(e) != held.get(e)
            }
            raise AssertionError(
                f"{len(wrong)} users differ, e.g. {list(wrong.items())[:5]}; daemon log: {log}"
            ) from None
        exit_status = daemon.signal(signal.SIGTERM)

    assert exit_status == 0, log.read_text()[-3000:]
    assert holding(emulator) == users.expected_contacts()
    assert all(len(emulator.received(1000 + quiet)) == 1 for quiet in QUIET), "unrelated calls"
    assert min(writers.counts.values()) > 0, writers.counts
    faults = emulator.stats()["faults"]
    assert faults["unavailable"] > 0 and faults["server_error"] > 0 and faults["dropped"] > 0
    for server_ in (primary, standby):  # the tracking tables were never created on the source
        engine = create_engine(server_.url(database))
        assert not [t for t in inspect(engine).get_table_names() if t.startswith("cdc_sync")]
        engine.dispose()
    users.dispose()
    primary.drop_database(database)
