"""The operator's commands, run while ``cdc-sync run`` works the same sync: a real PostgreSQL
source, the emulator over HTTP, and the tracking database the commands and the daemon share."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from test_daemon import (
    DEADLINE,
    add_users_in_order,
    cdc_sync,
    cdc_sync_args,
    daemon,
    read_state,
    stderr_of,
    wait_until,
)
from userdb import UserDb, write_config

from cdc_sync.emulator import EmulatorServer, Faults
from cdc_sync.models import sync_runs
from cdc_sync.state import decode_value

USERS = range(1, 21)


@dataclass
class Running:
    """A daemon syncing ``users`` to the emulator, every second, and how to talk to it."""

    users: UserDb
    api: EmulatorServer
    config: Path
    state_url: str
    process: subprocess.Popen[str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an operator command beside the daemon, with no terminal on stdin."""
        return subprocess.run(
            cdc_sync_args(self.config, *args),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.config.parent,
        )

    def until(self, condition: object, what: str) -> None:
        wait_until(condition, what, self.process)  # type: ignore[arg-type]

    def status_of(self, key: int) -> str | None:
        rows = read_state(self.state_url, "cdc_sync_status")
        return next((r["status"] for r in rows if r["source_key"] == str(key)), None)

    def runs_after(self, run_id: int) -> list[dict[str, Any]]:
        engine = create_engine(self.state_url)
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(sync_runs)
                    .where(sync_runs.c.id > run_id, sync_runs.c.finished_at.is_not(None))
                    .order_by(sync_runs.c.id)
                )
                return [dict(r._mapping) for r in rows]
        finally:
            engine.dispose()

    def last_run(self) -> int:
        return max(int(r["id"]) for r in read_state(self.state_url, "cdc_sync_runs"))


@pytest.fixture
def running(
    users: UserDb, api: EmulatorServer, state_url: str, tmp_path: Path
) -> Iterator[Running]:
    """Twenty users, user 5 refused for good (40007) on its first push, all others synced."""
    add_users_in_order(users, USERS)
    api.emulator.set_faults(Faults(fail_codes={1005: 40007}))
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=state_url,
        api_url=api.url,
        source={"lookback": "0s"},
    )
    assert cdc_sync(config, "migrate").returncode == 0
    with daemon(config) as process:
        world = Running(users, api, config, state_url, process)
        world.until(
            lambda: world.status_of(5) == "failed" and len(api.emulator.contacts) == 19,
            "the first cycle recorded every user",
        )
        # The users are recorded with their page; the cycle goes on to write the sync's state
        # (the sweep of rows outside the cursor's reach) before its run row is finished.
        world.until(lambda: bool(world.runs_after(0)), "the first cycle finished")
        yield world
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE) == 0, stderr_of(config)
    assert "Traceback" not in stderr_of(config)


def test_show_gives_status_and_history_without_contacts(running: Running) -> None:
    """``show KEY`` and ``show --euid N`` print the user's row and outcomes; never an email."""
    by_key = running("show", "5")
    by_euid = running("show", "--euid", "1005")
    unknown = running("show", "999")

    assert by_key.returncode == 0, by_key.stderr
    assert by_euid.stdout == by_key.stdout
    text = by_key.stdout
    assert "user 5\n" in text
    assert "status:        failed" in text
    assert "code 40007" in text
    history = text.split("history (newest first)\n")[1].splitlines()
    assert len(history) == 2 and "failed" in history[1]  # the heading, then one outcome
    assert "@example.com" not in text
    assert unknown.returncode == 1
    assert "has no record of user 999" in unknown.stderr


def test_retry_failed_pushes_a_failed_user_while_the_daemon_runs(running: Running) -> None:
    """Once the refusal is fixed, ``retry --failed`` gets the failed user pushed by the daemon,
    whose memory of an empty retry queue does not overrule the command."""
    running.api.emulator.set_faults(Faults())

    result = running("retry", "--failed")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 users")
    running.until(lambda: running.status_of(5) == "synced", "user 5 was pushed again")
    assert 1005 in running.api.emulator.contacts
    assert all(len(got) == 1 for euid, got in running.api.emulator.all_received().items())


def test_resync_pushes_a_synced_user_again(running: Running) -> None:
    """``resync KEY`` sends the user's current row again though its hash is unchanged."""
    result = running("resync", "3")

    assert result.returncode == 0, result.stderr
    running.until(lambda: len(running.api.emulator.received(1003)) == 2, "user 3 was re-sent")
    assert running.api.emulator.received(1003)[1]["email"] == "user3@example.com"
    assert len(running.api.emulator.received(1004)) == 1


def test_resync_all_pushes_every_user_again(running: Running) -> None:
    """``resync --all`` asks for confirmation, then every user is sent once more."""
    refused = running("resync", "--all")
    assert refused.returncode == 1
    assert "add --yes" in refused.stderr
    running.api.emulator.set_faults(Faults())

    result = running("resync", "--all", "--yes")

    assert result.returncode == 0, result.stderr
    received = running.api.emulator.all_received
    running.until(
        lambda: all(len(received().get(1000 + i, ())) == 2 for i in USERS if i != 5),
        "every synced user was sent again",
    )
    running.until(lambda: running.status_of(5) == "synced", "user 5 too, now accepted")


def test_reset_watermark_needs_confirmation_then_rereads_from_the_time(running: Running) -> None:
    """Without --yes and no terminal nothing changes; with it, the daemon's next cycle reads
    every row at or after the time again, pushing none of them (they are unchanged)."""
    accepted = running.api.emulator.stats()["accepted"]
    before = read_state(running.state_url, "cdc_sync_state")[0]

    refused = running("reset-watermark", "--to", "2024-01-01T00:00:15")
    assert refused.returncode == 1
    assert read_state(running.state_url, "cdc_sync_state")[0]["epoch"] == before["epoch"]

    last = running.last_run()
    result = running("reset-watermark", "--to", "2024-01-01T00:00:15", "--yes")

    assert result.returncode == 0, result.stderr
    assert "the next cycle starts from" in result.stdout
    running.until(
        lambda: any(r["rows_read"] > 1 for r in running.runs_after(last)), "a cycle read rows again"
    )
    reread = next(r for r in running.runs_after(last) if r["rows_read"] > 1)
    # users 15 to 20, and 14: the new watermark's row, which every cycle reads again
    assert reread["rows_read"] == 7
    assert reread["synced"] == 0
    assert running.api.emulator.stats()["accepted"] == accepted
    state = read_state(running.state_url, "cdc_sync_state")[0]
    assert decode_value(state["key_value"]) == 20
    assert state["reset_requested_at"] is None


def test_reset_watermark_to_the_beginning_rereads_the_whole_table(running: Running) -> None:
    """``reset-watermark --beginning --yes``: the next cycle reads all twenty rows again."""
    last = running.last_run()

    result = running("reset-watermark", "--beginning", "--yes")

    assert result.returncode == 0, result.stderr
    running.until(
        lambda: any(r["rows_read"] > 1 for r in running.runs_after(last)), "a cycle read rows again"
    )
    reread = next(r for r in running.runs_after(last) if r["rows_read"] > 1)
    assert (reread["rows_read"], reread["synced"], reread["watermark_before"]) == (20, 0, None)


def test_dry_run_and_prune_run_beside_the_daemon(running: Running) -> None:
    """``once --dry-run`` does not wait for the daemon's lock and changes nothing; ``prune``
    deletes nothing recent."""
    accepted = running.api.emulator.stats()["accepted"]
    state = read_state(running.state_url, "cdc_sync_state")

    preview = running("once", "--dry-run")
    pruned = running("prune")

    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.startswith("dry run of sync users: nothing was pushed or recorded")
    assert "push:    0" in preview.stdout
    assert read_state(running.state_url, "cdc_sync_state") == state
    assert running.api.emulator.stats()["accepted"] == accepted
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("deleted 0 runs and 0 history entries")


def test_dry_run_counts_and_samples_what_would_be_pushed(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """``once --dry-run`` names the users a cycle would push and counts the rest, calling no
    API and writing no run, status or watermark."""
    add_users_in_order(users, USERS)
    users.change(7, engagelab_euid=None)  # skipped: no euid
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
    )
    assert cdc_sync(config, "migrate").returncode == 0

    result = cdc_sync(config, "once", "--dry-run", "--sample", "3")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  read:    20 rows, 0 users due for a retry" in lines
    assert "  push:    19" in lines
    assert "  unchanged: 0, deferred: 0, skipped: 1" in lines
    assert "  e.g.:    1, 2, 3" in lines
    assert api.emulator.stats()["requests"] == 0
    for table in ("cdc_sync_runs", "cdc_sync_status", "cdc_sync_state"):
        assert read_state(f"sqlite:///{tmp_path}/state.db", table) == []


def test_a_pending_reset_shows_in_status_and_the_dry_run(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """A reset asked for while no daemon runs waits for the next cycle; status and the dry run
    both start from it."""
    add_users_in_order(users, USERS)
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        source={"lookback": "0s"},
    )
    assert cdc_sync(config, "migrate").returncode == 0
    assert cdc_sync(config, "once").returncode == 0
    at = datetime(2024, 1, 1, 0, 0, 18, tzinfo=UTC).isoformat()

    reset = cdc_sync(config, "reset-watermark", "--to", at, "--yes")
    status = cdc_sync(config, "status")
    preview = cdc_sync(config, "once", "--dry-run")

    assert reset.returncode == 0, reset.stderr
    assert "watermark reset pending: the next cycle starts from" in status.stdout
    # users 18 to 20, and 17, the row at the watermark the reset leads to
    assert "  read:    4 rows, 0 users due for a retry" in preview.stdout.splitlines()
