"""``cdc-sync run`` as a real process: it syncs on a schedule and stops cleanly on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from userdb import UserDb, write_config

from cdc_sync.cli import stop_within
from cdc_sync.config import load_settings
from cdc_sync.emulator import EmulatorServer, Faults
from cdc_sync.models import metadata
from cdc_sync.state import decode_value

DEADLINE = 60.0  # seconds; generous, so a slow machine is not a failure
POLL = 0.02


def cdc_sync_args(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdc_sync.cli", "-c", str(config), *args]


def cdc_sync(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one command to completion and capture its output."""
    return subprocess.run(
        cdc_sync_args(config, *args),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ),
        cwd=config.parent,
    )


@contextmanager
def daemon(
    config: Path, command: str = "run", env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``cdc-sync run`` (or another command) in a child process (this environment plus ``env``),
    its output in files beside the config; killed if the test leaves it running."""
    with (config.parent / "run.out").open("w") as out, (config.parent / "run.err").open("w") as err:
        process = subprocess.Popen(
            cdc_sync_args(config, command),
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=config.parent,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def stderr_of(config: Path) -> str:
    return (config.parent / "run.err").read_text()


def wait_until(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[str] | None = None
) -> None:
    """Wait for ``condition`` (a readiness wait); fail after DEADLINE or if ``process`` exits."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the daemon exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(POLL)


def add_users_in_order(users: UserDb, ids: Iterable[int]) -> None:
    """Users with an email and euid 1000+id, each updated one second after the one before."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    users.insert(
        {
            "id": i,
            "name": f"user {i}",
            "email": f"user{i}@example.com",
            "engagelab_euid": 1000 + i,
            "updated_at": start + timedelta(seconds=i),
        }
        for i in ids
    )


def read_state(url: str, table: str) -> list[dict[str, Any]]:
    """Every row of one tracking table."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(select(metadata.tables[table]))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_daemon_after_recording_what_it_pushed(
    users: UserDb, api: EmulatorServer, state_url: str, tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal mid-cycle ends the process with 0, every accepted user recorded, nothing lost."""
    add_users_in_order(users, range(1, 301))
    emulator = api.emulator
    emulator.set_faults(Faults(latency=0.05))
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=state_url,
        api_url=api.url,
        source={"batch_size": 20, "lookback": "0s"},
        engagelab={"concurrency": 2},
    )
    assert cdc_sync(config, "migrate").returncode == 0

    with daemon(config) as process:
        wait_until(lambda: emulator.stats()["accepted"] >= 1, "a user was accepted", process)
        process.send_signal(signum)
        status = process.wait(timeout=DEADLINE)

    assert status == 0, stderr_of(config)
    assert "Traceback" not in stderr_of(config)
    accepted = emulator.all_received()
    assert 0 < len(accepted) < 300  # it stopped mid-cycle
    last_run = max(read_state(state_url, "cdc_sync_runs"), key=lambda run: run["id"])
    assert last_run["outcome"] == "stopped"
    assert last_run["finished_at"] is not None
    assert last_run["synced"] == len(accepted)
    statuses = read_state(state_url, "cdc_sync_status")
    assert sorted(s["euid"] for s in statuses if s["status"] == "synced") == sorted(accepted)
    recorded = {int(s["source_key"]) for s in statuses}
    (watermark,) = read_state(state_url, "cdc_sync_state")
    assert all(i in recorded for i in range(1, decode_value(watermark["key_value"]) + 1))

    emulator.set_faults(Faults())
    after = cdc_sync(config, "once")

    assert after.returncode == 0, after.stderr
    assert f": synced {300 - len(accepted)}, " in after.stdout
    assert emulator.contacts == users.expected_contacts()
    assert all(len(got) == 1 for got in emulator.all_received().values())


def test_daemon_picks_up_a_change_made_while_it_runs(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """A user changed while the daemon runs reaches EngageLab on a later cycle."""
    users.add_users(range(1, 21))
    emulator = api.emulator
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        schedule={"interval": "1s"},
    )
    assert cdc_sync(config, "migrate").returncode == 0

    with daemon(config) as process:
        wait_until(lambda: emulator.stats()["accepted"] >= 20, "every user was accepted", process)
        users.change(5, email="changed5@example.com")
        wait_until(
            lambda: emulator.contacts[1005]["email"] == "changed5@example.com",
            "the changed email arrived",
            process,
        )
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=DEADLINE)

    assert status == 0, stderr_of(config)
    assert "Traceback" not in stderr_of(config)
    assert [p["email"] for p in emulator.received(1005)] == [
        "user5@example.com",
        "changed5@example.com",
    ]
    assert all(len(got) == 1 for euid, got in emulator.all_received().items() if euid != 1005)


TOLD = 1005  # the euid the emulator answers 429 Retry-After: 600


@pytest.mark.parametrize("command", ["once", "run"])
def test_sigterm_ends_a_retry_after_pause_within_the_documented_bound(
    users: UserDb, api: EmulatorServer, state_url: str, tmp_path: Path, command: str
) -> None:
    """Told to wait 600 s by a 429, ``once`` and ``run`` exit 0 on SIGTERM within the README's
    bound, the run recorded stopped, the told user retrying after the 5 minute cap, nothing
    unsent recorded; a later ``once`` sends those not sent."""
    add_users_in_order(users, range(1, 41))
    emulator = api.emulator
    emulator.set_faults(Faults(throttled_euids=[TOLD], retry_after=600))
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=state_url,
        api_url=api.url,
        source={"batch_size": 10, "lookback": "0s"},
        engagelab={"concurrency": 2},
    )
    bound = stop_within(load_settings(config, os.environ))
    assert cdc_sync(config, "migrate").returncode == 0

    with daemon(config, command) as process:
        wait_until(lambda: emulator.stats()["faults"]["throttled"] >= 1, "the 429", process)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=bound)  # the hang guard is the bound itself

    assert status == 0, stderr_of(config)
    assert "Traceback" not in stderr_of(config)
    accepted = {euid - 1000 for euid in emulator.all_received()}
    (last_run,) = read_state(state_url, "cdc_sync_runs")
    assert (last_run["outcome"], last_run["synced"]) == ("stopped", len(accepted))
    assert last_run["finished_at"] is not None
    statuses = {int(s["source_key"]): s for s in read_state(state_url, "cdc_sync_status")}
    told = statuses.pop(TOLD - 1000)
    assert (told["status"], told["last_code"]) == ("retrying", 429)
    assert told["next_attempt_at"] - told["last_attempt_at"] == timedelta(minutes=5)
    assert {key for key, s in statuses.items() if s["status"] == "synced"} == accepted
    assert set(statuses) == accepted and len(accepted) < 39
    (watermark,) = read_state(state_url, "cdc_sync_state")
    assert all(
        i in statuses or i == TOLD - 1000
        for i in range(1, decode_value(watermark["key_value"]) + 1)
    )

    emulator.set_faults(Faults())
    after = cdc_sync(config, "once")

    assert after.returncode == 0, after.stderr
    assert f"users: synced {39 - len(accepted)}, " in after.stdout
    assert set(emulator.all_received()) == {1000 + i for i in range(1, 41)} - {TOLD}
    assert all(len(got) == 1 for got in emulator.all_received().values())
