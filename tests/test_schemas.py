"""The user tables real applications have: odd cursors, quoted names, partitions, views."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import DELETE, cdc_sync, edit
from userdb import UserDb, write_config

from cdc_sync.emulator import EmulatorServer


def sql(users: UserDb, *statements: str) -> None:
    """Run statements on the source database, as its owner would on the primary."""
    with users.engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)


def config_for(users: UserDb, api: EmulatorServer, tmp_path: Path, **source: object) -> Path:
    """A migrated config over ``users``, with ``source`` settings changed."""
    config = write_config(
        tmp_path / "config.yaml",
        source_url=users.url,
        state_url=f"sqlite:///{tmp_path}/state.db",
        api_url=api.url,
        source=source,
    )
    migrated = cdc_sync(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return config


# -- a lookback of the wrong kind for the cursor ---------------------------------------------


@pytest.mark.parametrize("command", ["check", "once"])
def test_numeric_cursor_without_a_lookback_exits_78_before_pushing(
    users: UserDb, api: EmulatorServer, tmp_path: Path, command: str
) -> None:
    """A numeric cursor left on the default (5m) lookback stops with exit 78, saying what to set."""
    sql(users, "ALTER TABLE users ADD COLUMN version bigint NOT NULL DEFAULT 1")
    users.add_users(range(1, 6))
    config = edit(config_for(users, api, tmp_path, cursor="version"), "source.lookback", DELETE)

    result = cdc_sync(config, command)

    assert result.returncode == 78, result.stdout + result.stderr
    assert (
        "source.lookback: not set, and its default (5m) is a duration, but the cursor "
        "version is a bigint: set source.lookback to a whole number of cursor units, "
        "e.g. 1000" in result.stderr
    )
    assert "timedelta" not in result.stderr
    assert api.emulator.stats()["requests"] == 0


@pytest.mark.parametrize("command", ["check", "once"])
def test_number_lookback_on_a_timestamp_cursor_exits_78_in_config_terms(
    users: UserDb, api: EmulatorServer, tmp_path: Path, command: str
) -> None:
    """``lookback: 300`` on a timestamptz cursor is refused at start-up, before any push."""
    users.add_users(range(1, 6))
    config = config_for(users, api, tmp_path, lookback=300)

    result = cdc_sync(config, command)

    assert result.returncode == 78, result.stdout + result.stderr
    assert (
        "source.lookback: 300 is a number of cursor units, but the cursor updated_at is a "
        "timestamp with time zone; write a duration, e.g. 300s or 5m" in result.stderr
    )
    assert api.emulator.stats()["requests"] == 0


def test_numeric_cursor_with_a_number_lookback_runs_again_and_again(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """A numeric cursor with ``lookback: 1000`` syncs on the first run and on every later one."""
    sql(users, "ALTER TABLE users ADD COLUMN version numeric NOT NULL DEFAULT 1")
    users.add_users(range(1, 6))
    config = config_for(users, api, tmp_path, cursor="version", lookback=1000)

    runs = [cdc_sync(config, "once") for _ in range(3)]

    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    assert api.emulator.contacts == users.expected_contacts()
