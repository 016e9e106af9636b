"""One active instance: the lock on both tracking backends, the daemon around it, real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine, create_engine, make_url, select, text
from userdb import UserDb, write_config

from cdc_sync.emulator import Emulator, EmulatorServer, Faults
from cdc_sync.lock import EX_TEMPFAIL, InstanceLock, LockBusy, advisory_key, lock_file_path
from cdc_sync.models import sync_runs
from cdc_sync.scheduler import Daemon
from cdc_sync.state import StateStore

DEADLINE = 30.0  # seconds any awaited condition may take before the test fails


def acquire_within(lock: InstanceLock, deadline: float = DEADLINE) -> bool:
    """``lock.acquire`` polling every 50 ms, giving up (False) after ``deadline`` seconds."""
    stop = threading.Event()
    timer = threading.Timer(deadline, stop.set)
    timer.start()
    try:
        return lock.acquire(stop, poll=0.05)
    finally:
        timer.cancel()


def wait_for(
    condition: Callable[[], bool],
    what: str,
    *,
    deadline: float = DEADLINE,
    details: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``condition`` every 50 ms until it holds; fail, saying ``what``, after ``deadline``."""
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up after {deadline:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.05)


@pytest.fixture
def state_db(state_url: str) -> Iterator[Engine]:
    """An engine on the tracking database (nothing is created in it)."""
    engine = create_engine(state_url)
    yield engine
    engine.dispose()


@pytest.fixture
def locks(state_db: Engine) -> Iterator[Callable[..., InstanceLock]]:
    """Makes locks on the tracking database, each released at the end of the test."""
    made: list[InstanceLock] = []

    def make(name: str = "users") -> InstanceLock:
        made.append(InstanceLock(state_db, name))
        return made[-1]

    yield make
    for lock in made:
        lock.release()


# -- the lock ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("users", 8342959446978526030),
        ("contacts", -731014562230815253),
        ("accounts", -5479193352027715115),
    ],
)
def test_advisory_key_is_a_fixed_signed_64_bit_number_per_name(name: str, key: int) -> None:
    """The key is derived from the name alone, so every process and release agrees on it."""
    assert advisory_key(name) == key
    assert -(2**63) <= key < 2**63


def test_lock_file_sits_beside_the_database_file() -> None:
    """The SQLite lock is a file per sync next to the database, URI filenames included."""
    assert lock_file_path("/var/lib/cdc-sync/state.db", "users") == Path(
        "/var/lib/cdc-sync/state.db.users.lock"
    )
    assert lock_file_path("file:/srv/state.db?mode=rw", "users") == Path("/srv/state.db.users.lock")


def test_second_lock_on_the_same_name_is_refused_until_the_first_is_released(
    locks: Callable[..., InstanceLock],
) -> None:
    """While one lock holds a sync, another is refused; after release, it is granted."""
    first, second = locks(), locks()

    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()

    assert second.try_acquire()
    assert not first.try_acquire()


def test_different_sync_names_do_not_conflict(locks: Callable[..., InstanceLock]) -> None:
    """Two syncs sharing a tracking database each get their own lock (a negative key too)."""
    users, contacts = locks("users"), locks("contacts")

    assert users.try_acquire()
    assert contacts.try_acquire()

    assert users.still_held() and contacts.still_held()


def test_holder_is_named_to_whoever_waits(locks: Callable[..., InstanceLock]) -> None:
    """A refused lock can say which host and process holds it; a free one names nobody."""
    first, second = locks(), locks()
    assert second.holder() is None

    first.try_acquire()

    assert f"pid {os.getpid()}" in (second.holder() or "")


def test_still_held_is_true_until_release(locks: Callable[..., InstanceLock]) -> None:
    """A held lock reports itself held; a released or never-taken one does not."""
    lock = locks("contacts")
    assert not lock.still_held()

    lock.try_acquire()
    held = lock.still_held()
    lock.release()

    assert held and not lock.still_held()


def test_loss_of_the_lock_is_noticed(
    locks: Callable[..., InstanceLock], state_url: str, state_db: Engine
) -> None:
    """Ending the lock's PostgreSQL session, or deleting its lock file, makes still_held False."""
    lock, other = locks(), locks()
    lock.try_acquire()

    if state_url.startswith("sqlite"):
        lock_file_path(str(state_db.url.database), "users").unlink()
    else:
        with state_db.connect() as connection:
            ended = (
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND application_name LIKE 'cdc-sync lock%'"
                    )
                )
                .scalars()
                .all()
            )
        assert ended == [True]

    assert not lock.still_held()
    assert acquire_within(other)


def test_lock_busy_names_the_sync_and_hides_the_password(state_url: str) -> None:
    """Entering a held lock raises LockBusy (exit 75) naming the sync and database, no secret."""
    url = make_url(state_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(password="hunter2")  # the test server trusts everyone, so it is ignored
    engine = create_engine(url)

    first, second = InstanceLock(engine, "users"), InstanceLock(engine, "users")

    try:
        with first, pytest.raises(LockBusy) as raised, second:
            pass
    finally:
        engine.dispose()

    assert raised.value.exit_code == EX_TEMPFAIL == 75
    message = str(raised.value)
    assert message.startswith("another instance of sync users holds the lock in ")
    assert "hunter2" not in message and f"pid {os.getpid()}" in message


def test_acquire_waits_until_stop_is_set_then_returns_false(
    locks: Callable[..., InstanceLock],
) -> None:
    """A waiting acquire logs lock_waiting once and gives up, False, as soon as stop is set."""
    held, waiter = locks(), locks()
    held.try_acquire()
    stop = threading.Event()
    result: list[bool] = []

    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=lambda: result.append(waiter.acquire(stop, poll=60)))
        thread.start()
        wait_for(lambda: any(e["event"] == "lock_waiting" for e in logs), "lock_waiting")
        stop.set()
        thread.join(timeout=DEADLINE)

    assert result == [False]
    assert [e["event"] for e in logs] == ["lock_waiting"]
    assert not waiter.still_held()


def test_acquire_gets_the_lock_once_it_is_released(locks: Callable[..., InstanceLock]) -> None:
    """A waiting acquire returns True once the holder lets go, and logs lock_acquired."""
    held, waiter = locks(), locks()
    held.try_acquire()
    result: list[bool] = []

    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(
            target=lambda: result.append(waiter.acquire(threading.Event(), poll=0.05))
        )
        thread.start()
        wait_for(lambda: any(e["event"] == "lock_waiting" for e in logs), "lock_waiting")
        held.release()
        thread.join(timeout=DEADLINE)

    assert result == [True]
    assert [e["event"] for e in logs][-1] == "lock_acquired"
    assert waiter.still_held()


HOLD_LOCK = """
import sys, threading
from sqlalchemy import create_engine
from cdc_sync.lock import InstanceLock

lock = InstanceLock(create_engine(sys.argv[1]), "users")
assert lock.try_acquire()
print("locked", flush=True)
threading.Event().wait()
"""


def test_lock_of_a_killed_process_is_taken_over(
    locks: Callable[..., InstanceLock], state_url: str, tmp_path: Path
) -> None:
    """When the holding process is SIGKILLed, the lock is freed and a waiter gets it."""
    out = tmp_path / "holder.out"
    with out.open("w") as sink:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, state_url], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for(
            lambda: "locked" in out.read_text(), "the child to take the lock", details=out.read_text
        )
        waiter = locks()
        refused = not waiter.try_acquire()

        holder.kill()
        holder.wait(timeout=DEADLINE)
        taken = acquire_within(waiter)
    finally:
        holder.kill()
        holder.wait(timeout=DEADLINE)

    assert refused and taken and waiter.still_held()


# -- the daemon around the lock, with stand-ins ------------------------------------------------


@dataclass
class FakeLock:
    """A lock the test takes away; counts what the daemon does with it."""

    held: bool = False
    acquired: int = 0
    released: int = 0
    describe: str = "fake lock"
    waiting: threading.Event = field(default_factory=threading.Event)
    grant: bool = True

    def acquire(
        self, stop: threading.Event, poll: float, attempted: Callable[[], None] = lambda: None
    ) -> bool:
        self.waiting.set()
        while not self.grant:
            if stop.wait(poll):
                return False
        if stop.is_set():
            return False
        self.held, self.acquired = True, self.acquired + 1
        return True

    def still_held(self) -> bool:
        return self.held

    def release(self) -> None:
        if self.held:
            self.released += 1
        self.held = False


@dataclass
class ScriptedEngine:
    """An engine whose cycles record whether the lock was held and run ``script`` per cycle."""

    lock: FakeLock
    script: Callable[[ScriptedEngine], None] = lambda engine: None
    cycles: list[tuple[int, bool]] = field(default_factory=list)
    daemon: Daemon | None = None

    settings: Any = field(default_factory=lambda: SimpleNamespace(name="users"))

    tenures: list[int] = field(default_factory=list)

    def run_cycle(self, stop: threading.Event | None = None) -> None:
        self.cycles.append((self.lock.acquired, self.lock.held))
        self.script(self)

    def begin_tenure(self) -> None:
        self.tenures.append(self.lock.acquired)


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Daemon.run installs SIGTERM and SIGINT handlers; put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restore_signals")
def test_daemon_that_loses_the_lock_stops_cycling_and_waits_for_it_again() -> None:
    """A lost lock ends the cycles of that tenure; the daemon re-acquires it before cycling on."""
    lock = FakeLock()

    def script(engine: ScriptedEngine) -> None:
        if engine.lock.acquired == 1:
            engine.lock.held = False  # lost during the first tenure's cycle
        else:
            assert engine.daemon is not None
            engine.daemon.stop()

    engine = ScriptedEngine(lock, script)
    daemon = Daemon(engine, timedelta(milliseconds=50), lock)  # type: ignore[arg-type]
    engine.daemon = daemon
    safety = threading.Timer(DEADLINE, daemon.stop)  # a broken daemon fails, it does not hang
    safety.start()

    with structlog.testing.capture_logs() as logs:
        status = daemon.run()
    safety.cancel()

    assert status == 0
    assert engine.cycles == [(1, True), (2, True)]
    assert engine.tenures == [1, 2]  # what the engine remembers is dropped at each new tenure
    assert (lock.acquired, lock.released, lock.held) == (2, 1, False)
    assert [e["event"] for e in logs].count("lock_lost") == 1


@pytest.mark.usefixtures("restore_signals")
def test_daemon_stopped_while_waiting_for_the_lock_runs_no_cycle() -> None:
    """A stop that comes while the lock is someone else's ends the daemon with 0 and no cycle."""
    lock = FakeLock(grant=False)
    engine = ScriptedEngine(lock)
    daemon = Daemon(engine, timedelta(seconds=1), lock)  # type: ignore[arg-type]

    def stop_once_waiting() -> None:
        lock.waiting.wait(DEADLINE)
        daemon.stop()

    stopper = threading.Thread(target=stop_once_waiting)
    stopper.start()

    status = daemon.run()
    stopper.join(timeout=DEADLINE)

    assert status == 0
    assert engine.cycles == [] and lock.acquired == 0


# -- real daemons ------------------------------------------------------------------------------


@dataclass
class Instance:
    """A ``cdc-sync run`` child process and the file its log goes to."""

    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text()

    def position(self, event: str) -> int | None:
        """Where ``event`` first appears in the log, or None."""
        found = re.search(rf"\b{event}\b", self.text())
        return found.start() if found else None

    def logged(self, event: str) -> bool:
        return self.position(event) is not None


@dataclass
class Setup:
    """The users table, the emulator, a migrated tracking database and a config for them."""

    users: UserDb
    emulator: Emulator
    state_url: str
    config: Path
    directory: Path
    started: list[Instance] = field(default_factory=list)

    def start(self, name: str) -> Instance:
        log = self.directory / f"{name}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "cdc_sync.cli", "-c", str(self.config), "run"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        self.started.append(Instance(process, log))
        return self.started[-1]

    def in_step(self) -> bool:
        """EngageLab holds exactly what the users table says it should."""
        return self.emulator.contacts == self.users.expected_contacts()

    def runs(self) -> list[tuple[datetime, datetime | None]]:
        """(started_at, finished_at) of every cycle in the run history."""
        engine = create_engine(self.state_url)
        try:
            with engine.connect() as connection:
                query = select(sync_runs.c.started_at, sync_runs.c.finished_at)
                return [(row.started_at, row.finished_at) for row in connection.execute(query)]
        finally:
            engine.dispose()

    def logs(self) -> str:
        return "\n".join(f"--- {i.log.name}\n{i.text()}" for i in self.started)


@pytest.fixture
def setup(pg_database: str, state_url: str, tmp_path: Path) -> Iterator[Setup]:
    """Thirty users, an emulator answering in 20 ms, the tracking tables, an INFO console log."""
    users = UserDb(pg_database)
    users.add_users(range(1, 31))
    state = StateStore(create_engine(state_url), "users")
    state.migrate()
    state.engine.dispose()
    emulator = Emulator("key", "secret")
    emulator.set_faults(Faults(latency=0.02))
    with EmulatorServer(emulator) as server:
        config = write_config(
            tmp_path / "config.yaml",
            source_url=pg_database,
            state_url=state_url,
            api_url=server.url,
            logging={"level": "INFO", "format": "console"},
        )
        world = Setup(users, emulator, state_url, config, tmp_path)
        try:
            yield world
        finally:
            for instance in world.started:
                instance.process.kill()
                instance.process.wait(timeout=DEADLINE)
            users.dispose()


def test_two_daemons_never_push_at_once_and_the_survivor_takes_over(setup: Setup) -> None:
    """Of two daemons on one tracking database only the lock holder cycles; when it is
    SIGKILLed the other takes the lock and syncs on, and SIGTERM then stops it with 0."""
    first = setup.start("first")
    wait_for(
        lambda: first.logged("lock_acquired") and setup.in_step(),
        "the first daemon to sync",
        details=setup.logs,
    )
    second = setup.start("second")
    wait_for(lambda: second.logged("lock_waiting"), "the second daemon to wait", details=setup.logs)
    runs_before = len(setup.runs())
    setup.users.add_users(range(31, 41))
    wait_for(
        lambda: setup.in_step() and len(setup.runs()) >= runs_before + 2,
        "two more cycles while both run",
        details=setup.logs,
    )

    assert not second.logged("cycle_started"), setup.logs()
    assert first.process.poll() is None and second.process.poll() is None

    kill_sent_at = datetime.now(UTC)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=DEADLINE)
    setup.users.add_users(range(41, 61))
    wait_for(
        lambda: second.logged("lock_acquired") and setup.in_step(),
        "the second daemon to take over and sync the new users",
        details=setup.logs,
    )

    second.process.send_signal(signal.SIGTERM)
    status = second.process.wait(timeout=DEADLINE)

    assert status == 0, setup.logs()
    waiting, acquired = second.position("lock_waiting"), second.position("lock_acquired")
    cycled, released = second.position("cycle_started"), second.position("lock_released")
    assert None not in (waiting, acquired, cycled, released), setup.logs()
    assert waiting < acquired < cycled < released  # type: ignore[operator]
    # The run the kill interrupted has no finish; it ended when the kill was sent, at the latest.
    spans = [(start, end or kill_sent_at) for start, end in setup.runs()]
    overlapping = [
        (a, b)
        for i, a in enumerate(spans)
        for b in spans[i + 1 :]
        if not (a[1] <= b[0] or b[1] <= a[0])
    ]
    assert overlapping == []
    assert any(start > kill_sent_at for start, _ in spans)


def test_daemon_waiting_for_the_lock_exits_0_on_sigterm_without_a_cycle(
    setup: Setup, locks: Callable[..., InstanceLock]
) -> None:
    """A daemon that never got the lock stops on SIGTERM with status 0, having pushed nothing."""
    assert locks().try_acquire()
    daemon = setup.start("daemon")
    wait_for(lambda: daemon.logged("lock_waiting"), "the daemon to wait", details=setup.logs)

    daemon.process.send_signal(signal.SIGTERM)
    status = daemon.process.wait(timeout=DEADLINE)

    assert status == 0, setup.logs()
    assert daemon.logged("daemon_stopped") and not daemon.logged("cycle_started")
    assert setup.emulator.stats()["requests"] == 0 and setup.runs() == []
