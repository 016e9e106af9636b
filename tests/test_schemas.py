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


# -- index advice that works -----------------------------------------------------------------


def create_table(users: UserDb, name: str, *, partitioned: bool = False) -> None:
    """A user table under a (quoted) ``name``, optionally partitioned by id into two ranges."""
    by = " PARTITION BY RANGE (id)" if partitioned else ""
    sql(
        users,
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, email text, engagelab_euid bigint, "
        f"updated_at timestamptz NOT NULL DEFAULT now()){by}",
    )


def printed_statements(output: str) -> list[str]:
    """The SQL statements ``check`` prints for the operator to run, one a line."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.startswith("           ")
        and line.strip().startswith(("CREATE ", "ALTER ", "UPDATE "))
    ]


def check_and_apply(users: UserDb, config: Path) -> tuple[str, list[str], str]:
    """``check``, then every statement it printed run on the server, then ``check`` again."""
    before = cdc_sync(config, "check")
    assert before.returncode == 0, before.stdout + before.stderr
    statements = printed_statements(before.stdout)
    with users.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    after = cdc_sync(config, "check")
    assert after.returncode == 0, after.stdout + after.stderr
    return before.stdout, statements, after.stdout


@pytest.mark.parametrize(
    ("schema", "table", "quoted"),
    [
        ("App", "UserAccounts", '"App"."UserAccounts"'),
        (None, "user", '"user"'),
        (None, '"; DROP TABLE canary; --', '"""; DROP TABLE canary; --"'),
    ],
    ids=["mixed case in a schema", "a reserved word", "an injection"],
)
def test_index_statement_runs_as_printed(
    users: UserDb, api: EmulatorServer, tmp_path: Path, schema: str | None, table: str, quoted: str
) -> None:
    """The printed CREATE INDEX quotes every name, runs on PostgreSQL, and then is found."""
    sql(users, 'CREATE SCHEMA "App"', "CREATE TABLE canary (id int)")
    create_table(users, quoted)
    config = config_for(users, api, tmp_path, schema=schema, table=table)
    config = edit(config, "contacts", {"email": "email"})

    before, statements, after = check_and_apply(users, config)

    assert len(statements) == 1 and f"ON {quoted} (updated_at, id);" in statements[0], before
    assert ": present" in after and "CREATE INDEX" not in after, after
    with users.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM canary").scalar() == 0


def test_partitioned_table_gets_statements_postgresql_accepts(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """A partitioned table is indexed partition by partition (an existing index is kept), then
    on the parent without CONCURRENTLY; afterwards check finds the parent's index."""
    create_table(users, "accounts", partitioned=True)
    sql(
        users,
        "CREATE TABLE accounts_low PARTITION OF accounts FOR VALUES FROM (0) TO (1000)",
        "CREATE TABLE accounts_high PARTITION OF accounts FOR VALUES FROM (1000) TO (MAXVALUE)",
        "CREATE INDEX accounts_low_seen ON accounts_low (updated_at, id)",
    )
    config = edit(
        config_for(users, api, tmp_path, table="accounts"), "contacts", {"email": "email"}
    )

    before, statements, after = check_and_apply(users, config)

    assert statements == [
        "CREATE INDEX CONCURRENTLY accounts_high_updated_at_id_idx "
        "ON public.accounts_high (updated_at, id);",
        "CREATE INDEX accounts_updated_at_id_idx ON accounts (updated_at, id);",
    ], before
    assert "partitioned" in before and "CONCURRENTLY" in before
    assert "index      accounts_updated_at_id_idx on (updated_at, id): present" in after, after


def test_partitions_indexed_one_by_one_are_recognised(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """Every partition holding a (cursor, key) index serves the poll: nothing to create."""
    create_table(users, "accounts", partitioned=True)
    sql(
        users,
        "CREATE TABLE accounts_low PARTITION OF accounts FOR VALUES FROM (0) TO (1000)",
        "CREATE TABLE accounts_high PARTITION OF accounts FOR VALUES FROM (1000) TO (MAXVALUE)",
        "CREATE INDEX ON accounts_low (updated_at, id)",
        "CREATE INDEX ON accounts_high (updated_at, id, email)",
    )
    config = edit(
        config_for(users, api, tmp_path, table="accounts"), "contacts", {"email": "email"}
    )

    result = cdc_sync(config, "check")

    assert result.returncode == 0, result.stderr
    assert (
        "index      one on each of its 2 partitions on (updated_at, id): present" in result.stdout
    ), result.stdout
    assert "CREATE INDEX" not in result.stdout


def test_view_gets_no_index_statement_but_the_cost_of_a_poll(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """PostgreSQL cannot index a view: check says so and shows how a page is planned."""
    users.add_users(range(1, 4))
    sql(users, "CREATE VIEW app_users AS SELECT * FROM users WHERE engagelab_euid IS NOT NULL")
    config = config_for(users, api, tmp_path, table="app_users")

    result = cdc_sync(config, "check")

    assert result.returncode == 0, result.stderr
    assert (
        "index      none applies: app_users is a view, which PostgreSQL cannot index: "
        "every poll runs its query (a page of 500 rows is planned as " in result.stdout
    )
    assert "on users, estimated cost " in result.stdout, result.stdout
    assert "CREATE INDEX" not in result.stdout


# -- rows outside the cursor's reach: NULL and infinite cursors --------------------------------


def legacy_rows(users: UserDb) -> None:
    """Users 1-3 stamped; 4-8 from before updated_at existed (NULL); 9 stamped 'infinity'."""
    sql(users, "ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    users.add_users(range(1, 4))
    users.add_users(range(4, 9), updated_at=None)
    users.add_users([9], updated_at="infinity")


def test_null_and_infinite_cursors_sync_once_and_status_counts_them(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """``once`` syncs rows with a NULL or infinite cursor and exits 0; the next ``once`` pushes
    nothing; ``status`` says how many rows are outside the cursor's reach."""
    legacy_rows(users)
    config = config_for(users, api, tmp_path)

    runs = [cdc_sync(config, "once") for _ in range(2)]
    status = cdc_sync(config, "status")

    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "synced 9," in runs[0].stdout and "synced 0," in runs[1].stdout, runs[1].stdout
    assert api.emulator.contacts == users.expected_contacts()
    assert (
        "outside the cursor's reach: 6 rows (NULL or infinite cursor), read by key" in status.stdout
    ), status.stdout


def test_check_counts_rows_outside_the_reach_and_prints_a_fix_that_runs(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """``check`` says the cursor is nullable, counts NULL and infinite rows, and prints the
    statements that fix the schema; once they have run, check finds nothing to fix."""
    legacy_rows(users)
    config = config_for(users, api, tmp_path)

    before, statements, after = check_and_apply(users, config)

    assert "cursor     updated_at: timestamp with time zone, nullable" in before, before
    assert "WARNING    5 rows have a NULL updated_at and 1 an infinite one" in before
    assert statements == [
        "UPDATE users SET updated_at = now() WHERE updated_at IS NULL OR NOT isfinite(updated_at);",
        "ALTER TABLE users ALTER COLUMN updated_at SET DEFAULT now(), "
        "ALTER COLUMN updated_at SET NOT NULL;",
        "ALTER TABLE users ADD CONSTRAINT users_updated_at_finite CHECK (isfinite(updated_at));",
    ]
    assert "cursor     updated_at: timestamp with time zone, NOT NULL" in after, after
    assert "rows have a NULL" not in after


# -- timestamp without time zone ---------------------------------------------------------------


def zoneless(users: UserDb) -> None:
    """``updated_at`` as Rails and Django without USE_TZ keep it: wall-clock time, no zone."""
    sql(users, "ALTER TABLE users ALTER COLUMN updated_at TYPE timestamp")


def test_check_names_a_zoneless_cursor_and_its_risks(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """``check`` names the cursor's type and, for a zone-less timestamp, the DST and writer-zone
    risks and what to do about them."""
    zoneless(users)
    config = config_for(users, api, tmp_path)

    result = cdc_sync(config, "check")

    assert result.returncode == 0, result.stderr
    assert "cursor     updated_at: timestamp without time zone, NOT NULL" in result.stdout
    warning = next(line for line in result.stdout.splitlines() if "without time zone, read" in line)
    for words in (
        "falls back (DST)",
        "ahead of the server's",
        "at least 1h",
        "audit",
        "timestamptz",
    ):
        assert words in warning, warning


def test_rows_ahead_of_the_clock_are_reported_by_check_status_and_the_log(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """Rows written by a writer whose zone is 3 hours ahead hold the watermark; check, status
    and the log say how many and by how much, instead of re-reading them in silence."""
    zoneless(users)
    users.add_users(range(1, 3))
    sql(users, "UPDATE users SET updated_at = localtimestamp + interval '3 hours'")
    config = config_for(users, api, tmp_path)

    runs = [cdc_sync(config, "once") for _ in range(2)]
    status = cdc_sync(config, "status")
    check = cdc_sync(config, "check")

    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "synced 2," in runs[0].stdout and "synced 0," in runs[1].stdout
    assert all("watermark_held" in r.stderr and "rows_ahead=2" in r.stderr for r in runs)
    held = "2 rows are stamped ahead of the source's clock, the furthest by 2h59m"
    assert f"watermark held: {held}" in status.stdout, status.stdout
    assert f"WARNING    {held}" in check.stdout, check.stdout
    assert "watermark: none" in status.stdout


def test_a_change_in_the_repeated_hour_is_caught_with_an_hour_of_lookback(
    users: UserDb, api: EmulatorServer, tmp_path: Path
) -> None:
    """At a DST fall-back a change stamped 01:05 lands after the watermark reached 01:55: with
    the lookback of an hour that check advises for a zone-less cursor, it is pushed."""
    zoneless(users)
    users.add_users(range(1, 3), updated_at="2026-10-25 01:55:00")
    config = config_for(users, api, tmp_path, lookback="1h")
    assert cdc_sync(config, "once").returncode == 0

    users.change(1, email="repeated-hour@example.com", updated_at="2026-10-25 01:05:00")
    result = cdc_sync(config, "once")

    assert "synced 1," in result.stdout, result.stdout + result.stderr
    assert api.emulator.received(1001)[-1] == {"email": "repeated-hour@example.com"}
