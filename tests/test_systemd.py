"""cdc-sync under systemd: the unit file, the notify protocol over a real socket, journald lines."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from sqlalchemy import text
from test_daemon import DEADLINE, add_users_in_order, cdc_sync, daemon, stderr_of, wait_until
from userdb import UserDb, write_config

from cdc_sync import logs
from cdc_sync.emulator import EmulatorServer, Faults
from cdc_sync.notify import Notifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "cdc-sync.service"
INSTALLED = "/opt/cdc-sync/bin/cdc-sync"
WATCHDOG_USEC = 2_000_000  # the daemon then checks (and may ping) every second


# -- the unit file --------------------------------------------------------------------------------


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The shipped unit with its program path pointed at this checkout's installed cdc-sync, since
    ``verify`` checks that ExecStart's program exists."""
    program = Path(sys.executable).parent / "cdc-sync"
    assert program.is_file(), program
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(program)))
    return copy


def test_the_unit_verifies(systemd_analyze: str, unit: Path) -> None:
    """``systemd-analyze verify`` accepts the unit: every directive is known and well formed."""
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert str(unit.name) not in result.stderr, result.stderr


def test_the_unit_is_hardened_to_an_exposure_of_two_or_less(
    systemd_analyze: str, unit: Path
) -> None:
    """``systemd-analyze security`` rates the unit's exposure 2.0 or less (it was 5.8)."""
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )

    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_waits_for_readiness_and_has_a_watchdog() -> None:
    """The unit is Type=notify with a watchdog, and neither a bad config nor a refusal restarts."""
    lines = set(UNIT.read_text().splitlines())

    assert {"Type=notify", "WatchdogSec=5min", "RestartPreventExitStatus=78 3"} <= lines


# -- the notify protocol --------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket bound where a service manager's would be, collecting what arrives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.address = address
        self.received: list[str] = []

    def next(self, timeout: float = DEADLINE) -> str | None:
        """The next datagram, or None if none arrives within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.received.append(message)
        return message

    def until(self, wanted: str, what: str) -> str:
        """Read datagrams until one holds the line ``wanted`` (a prefix of it); fail after
        DEADLINE."""
        while True:
            message = self.next()
            if message is None:
                pytest.fail(f"no {what} arrived; got {self.received}")
            if any(line.startswith(wanted) for line in message.splitlines()):
                return message

    def drain(self) -> list[str]:
        """Everything already queued, without waiting."""
        drained = []
        self.sock.setblocking(False)
        try:
            while True:
                drained.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return drained

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    """A notify socket at a short filesystem path (sun_path holds 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="cdc-notify-", dir="/tmp")
    listener = NotifySocket(os.path.join(directory, "notify"))
    yield listener
    listener.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_each_message_as_one_datagram(abstract: bool) -> None:
    """READY, STATUS, WATCHDOG and STOPPING reach a path or an abstract-namespace socket."""
    directory = tempfile.mkdtemp(prefix="cdc-notify-", dir="/tmp")
    address = f"@cdc-sync-test-{uuid.uuid4().hex}" if abstract else f"{directory}/notify"
    listener = NotifySocket(address)
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"})
    try:
        notifier.ready("starting")
        notifier.status("cycle 1 ok")
        notifier.watchdog()
        notifier.stopping()

        received = [listener.next(), listener.next(), listener.next(), listener.next()]
    finally:
        notifier.close()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)

    assert received == [
        "READY=1\nSTATUS=starting",
        "STATUS=cycle 1 ok",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping: finishing the page in flight",
    ]
    assert notifier.watchdog_seconds == 3.0


@pytest.mark.parametrize(
    ("environ", "seconds"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ],
)
def test_the_watchdog_applies_only_as_systemd_says(
    environ: dict[str, str], seconds: float | None
) -> None:
    """WATCHDOG_USEC sets the watchdog, unless it is not positive or names another process."""
    assert Notifier(environ).watchdog_seconds == seconds


def test_without_a_notify_socket_nothing_is_sent() -> None:
    """Outside systemd, notifications are no-ops and open no socket."""
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})

    notifier.ready("x")
    notifier.watchdog()

    assert notifier._socket is None


def test_daemon_pings_while_cycles_progress_and_stops_when_a_query_hangs(
    users: UserDb, api: EmulatorServer, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """READY, then pings while cycles run; none while the page query waits on a lock the test
    holds; pings again once it is let go; STOPPING on SIGTERM, then exit 0."""
    add_users_in_order(users, range(1, 11))
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        source={"statement_timeout": "120s"},
    )
    assert cdc_sync(config, "migrate").returncode == 0
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    with daemon(config, env=env) as process, users.engine.connect() as blocker:
        notify_socket.until("READY=1", "READY")
        notify_socket.until("STATUS=cycle", "a cycle's summary")
        notify_socket.until("WATCHDOG=1", "a watchdog ping after a cycle")
        assert api.emulator.stats()["accepted"] == 10

        blocker.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
        wait_until(lambda: blocked_on_lock(users), "a cycle waits on the test's lock", process)
        notify_socket.drain()  # sent before the cycle blocked
        silent = notify_socket.next(timeout=3 * WATCHDOG_USEC / 1e6)
        blocker.rollback()
        resumed = notify_socket.until("WATCHDOG=1", "a ping once the query ran")

        process.send_signal(signal.SIGTERM)
        stopping = notify_socket.until("STOPPING=1", "STOPPING")
        status = process.wait(timeout=DEADLINE)

    assert silent is None, f"a ping arrived while the cycle was blocked: {silent!r}"
    assert "WATCHDOG=1" in resumed
    assert stopping.startswith("STOPPING=1")
    assert status == 0, stderr_of(config)
    assert "Traceback" not in stderr_of(config)


def blocked_on_lock(users: UserDb) -> bool:
    """Whether some other session's query on the source is waiting for a lock."""
    with users.engine.connect() as connection:
        waiting = connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid() AND datname = current_database()"
            )
        )
    return bool(waiting)


def test_daemon_refused_by_engagelab_says_so_and_exits_3(
    users: UserDb, api: EmulatorServer, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """Every cycle refused (bad credentials): STATUS says so each time, and after three in a row
    the daemon exits 3, which the unit does not restart."""
    add_users_in_order(users, range(1, 4))
    api.emulator.set_faults(Faults(auth_fail_code=50031))
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
    )
    assert cdc_sync(config, "migrate").returncode == 0
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    with daemon(config, env=env) as process:
        first = notify_socket.until("STATUS=EngageLab refused 1 ", "the first refusal")
        third = notify_socket.until("STATUS=EngageLab refused 3 ", "the third refusal")
        status = process.wait(timeout=DEADLINE)

    assert "code 50031" in first
    assert "restart" in third
    assert status == 3, stderr_of(config)
    assert "daemon_giving_up" in stderr_of(config)
    assert "Traceback" not in stderr_of(config)


# -- journald priorities --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        ("debug", "<7>"),
        ("info", "<6>"),
        ("warning", "<4>"),
        ("error", "<3>"),
        ("critical", "<2>"),
        ("WARNING", "<4>"),
        ("CRITICAL", "<2>"),
    ],
)
def test_each_level_has_its_syslog_priority(level: str, prefix: str) -> None:
    """structlog's and the standard library's level names map to syslog(3) priorities."""
    assert logs.priority_prefix(level) == prefix


def test_log_lines_carry_their_priority_for_the_journal() -> None:
    """With the journal on stderr, every line starts with its priority: structlog's and the
    libraries' alike; without it, no prefix."""
    import logging

    stream = io.StringIO()
    real = sys.stderr
    sys.stderr = stream
    try:
        logs.configure("INFO", "json", journal=True)
        structlog.get_logger("t").warning("page_recorded", rows=1)
        structlog.get_logger("t").info("cycle_started")
        logging.getLogger("somelib").warning("careful")
        logs.configure("INFO", "json", journal=False)
        structlog.get_logger("t").warning("plain")
    finally:
        sys.stderr = real
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()

    lines = stream.getvalue().splitlines()
    assert lines[0].startswith('<4>{"rows": 1, "event": "page_recorded"'), lines
    assert lines[1].startswith('<6>{"event": "cycle_started"'), lines
    assert "<4>somelib: careful" in lines, lines
    assert lines[-1].startswith('{"event": "plain"'), lines


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    """stderr counts as the journal only when JOURNAL_STREAM names its device and inode."""
    with (tmp_path / "err").open("w") as stream:
        found = os.fstat(stream.fileno())
        same = {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}
        other = {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino + 1}"}

        assert logs.to_journal(same, stream)
        assert not logs.to_journal(other, stream)
        assert not logs.to_journal({}, stream)
        assert not logs.to_journal({"JOURNAL_STREAM": "garbage"}, stream)


def test_an_error_message_reaches_the_journal_as_an_error(tmp_path: Path) -> None:
    """A command's closing error, printed to a journal stderr, is marked priority 3 per line."""
    err = tmp_path / "err"
    with err.open("w") as stream:
        found = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}
        result = subprocess.run(
            [sys.executable, "-m", "cdc_sync.cli", "-c", str(tmp_path / "missing.yaml"), "status"],
            stderr=stream,
            stdout=subprocess.PIPE,
            env=env,
            check=False,
            timeout=60,
        )

    assert result.returncode == 78
    lines = err.read_text().splitlines()
    assert lines and all(
        line.startswith("<3>cdc-sync: ") or line.startswith("<3>") for line in lines
    ), lines
