"""Reading a production replica safely: clocks, long transactions, conflicts, lag, audit."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from harness import World, wait_for
from sqlalchemy import create_engine, func, select, text
from userdb import CONTACT_COLUMNS, UserDb

from cdc_sync.errors import Stopped
from cdc_sync.models import sync_runs
from cdc_sync.source import Source, SourceSpec
from cdc_sync.testing.postgres import PostgresServer, scratch_dir


@pytest.fixture
def world(pg_database: str, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    with World.running(pg_database, f"sqlite:///{tmp_path}/state.db") as w:
        yield w


@pytest.fixture
def xid_world(pg_database: str, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    with World.running(pg_database, f"sqlite:///{tmp_path}/state.db", xid8=True) as w:
        w.lookback = timedelta(0)
        yield w


def test_future_cursor_does_not_carry_the_watermark(world: World) -> None:
    """A row stamped an hour ahead is pushed, but the watermark stays at the source's clock."""
    world.lookback = timedelta(0)
    world.users.add_users(range(1, 4))
    world.users.add_users([4], updated_at=datetime.now(UTC) + timedelta(hours=1))

    first = world.cycle()
    world.users.add_users([5])  # committed later, stamped honestly: behind the future row
    world.cycle()

    assert first.watermark_after is not None and first.watermark_after.key == 3
    assert world.emulator.received(1004) == [{"email": "user4@example.com"}]
    assert world.emulator.received(1005) == [{"email": "user5@example.com"}]


def noting(delays: list[float]) -> Callable[[threading.Event, float], bool]:
    """A Source wait that notes each delay and goes on at once, never stopped."""

    def wait(stop: threading.Event, delay: float) -> bool:
        delays.append(delay)
        return False

    return wait


def read_while_killed(pg_database: str, source: Source, stop: threading.Event) -> object:
    """Read a page of ``slow_users`` while its backend is terminated mid-query; what came back
    (the rows, or the exception)."""
    result: list[object] = []

    def read() -> None:
        try:
            result.append(source.read_page(None, None, 10, stop=stop))
        except Exception as exc:
            result.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    with psycopg.connect(pg_database.replace("+psycopg", ""), autocommit=True) as admin:

        def reading() -> bool:
            return admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                "'%FROM slow_users%' AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchone() == (1,)

        wait_for(reading, "the page query to start")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE '%FROM slow_users%' AND state = 'active' AND pid <> pg_backend_pid()"
        )
    reader.join()
    return result[0]


@pytest.fixture
def slow_users(pg_database: str) -> Iterator[SourceSpec]:
    """Three users behind a view that takes half a second to read."""
    db = UserDb(pg_database)
    db.add_users(range(1, 4))
    with db.engine.begin() as connection:
        connection.execute(
            text("CREATE VIEW slow_users AS SELECT u.* FROM users u, LATERAL pg_sleep(0.5)")
        )
    yield SourceSpec("slow_users", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)
    db.dispose()


def test_read_retries_after_the_connection_is_killed(
    pg_database: str, slow_users: SourceSpec
) -> None:
    """A page whose backend is terminated mid-query is read again on a fresh connection."""
    delays: list[float] = []
    source = Source(create_engine(pg_database), slow_users, wait=noting(delays)).open()

    rows = read_while_killed(pg_database, source, threading.Event())

    assert delays == [0.2]
    assert [row.key for row in rows] == [1, 2, 3]  # type: ignore[attr-defined]


def test_a_stop_ends_a_read_instead_of_retrying_it(
    pg_database: str, slow_users: SourceSpec
) -> None:
    """A read that failed after the stop signal raises Stopped instead of waiting to retry."""
    source = Source(create_engine(pg_database), slow_users).open()
    stop = threading.Event()
    stop.set()

    outcome = read_while_killed(pg_database, source, stop)

    assert isinstance(outcome, Stopped)


@pytest.fixture
def conflicting_standby() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and a standby that cancels queries at once when replay conflicts with them."""
    base = scratch_dir()
    primary = PostgresServer(base, name="primary")
    standby = None
    try:
        primary.init()
        primary.start()
        standby = primary.make_standby(
            settings={"max_standby_streaming_delay": "0", "hot_standby_feedback": "off"}
        )
        standby.start()
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_recovery_conflict_is_retried(
    conflicting_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    """A page the standby cancels for a replay conflict (SQLSTATE 40001) is read again."""
    primary, standby = conflicting_standby
    primary.create_database("app")
    db = UserDb(primary.url("app"))
    db.add_users(range(1, 6))
    with db.engine.begin() as connection:
        connection.execute(
            text("CREATE VIEW slow_users AS SELECT u.* FROM users u, LATERAL pg_sleep(2)")
        )
    primary.wait_for_replay(standby)
    delays: list[float] = []
    spec = SourceSpec("slow_users", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)
    source = Source(create_engine(standby.url("app")), spec, wait=noting(delays)).open()
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(source.read_page(None, None, 10)))

    reader.start()
    with psycopg.connect(standby.dsn("app"), autocommit=True) as watch:
        wait_for(
            lambda: (
                watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                    "'%FROM slow_users%' AND state = 'active' AND pid <> pg_backend_pid()"
                ).fetchone()
                == (1,)
            ),
            "the page query to start on the standby",
        )
        db.change(5, email="changed@example.com")  # a dead tuple the standby's query can still see
        primary.execute("VACUUM users", "app")  # its removal conflicts with that query on replay
        reader.join()
        conflicts = watch.execute(
            "SELECT confl_snapshot FROM pg_stat_database_conflicts WHERE datname = 'app'"
        ).fetchone()

    assert conflicts is not None and conflicts[0] >= 1
    assert delays[:1] == [0.2]
    assert [row.key for row in result[0]] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    db.dispose()


def test_reading_a_standby_records_replica_lag(standby_pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Against a hot standby a cycle works (no write reaches it) and records the replay lag."""
    primary, standby = standby_pair
    primary.create_database("lag")
    with World.running(
        primary.url("lag"), f"sqlite:///{tmp_path}/s.db", read_url=standby.url("lag")
    ) as world:
        world.users.add_users(range(1, 20))
        primary.wait_for_replay(standby)

        report = world.cycle()

        with world.state.engine.connect() as connection:
            lag = connection.scalar(select(sync_runs.c.replica_lag_s))
        assert report.counts.synced == 19
        assert lag is not None and 0 <= lag < 60
    primary.drop_database("lag")


def test_primary_source_records_no_lag(world: World) -> None:
    """A source that is not a replica has no replay lag to record."""
    world.users.add_users([1])

    world.cycle()

    with world.state.engine.connect() as connection:
        assert connection.scalar(select(sync_runs.c.replica_lag_s)) is None


def open_long_transaction(db: UserDb, user_id: int, email: str) -> psycopg.Connection:
    """Start a write transaction that stamps updated_at with its start time and stays open."""
    connection = psycopg.connect(db.url.replace("+psycopg", ""))
    connection.execute(
        "UPDATE users SET email = %s, updated_at = now() WHERE id = %s", (email, user_id)
    )
    return connection


def test_xid8_mode_waits_for_a_long_transaction(xid_world: World) -> None:
    """In xid8 mode nothing behind a running transaction is read until it ends: nothing is lost."""
    xid_world.users.add_users(range(1, 4))
    xid_world.cycle()
    long_tx = open_long_transaction(xid_world.users, 1, "late@example.com")
    xid_world.users.add_users([4])

    during = xid_world.cycle()
    long_tx.commit()
    long_tx.close()
    after = xid_world.cycle()

    assert during.counts.rows_read == 0  # user 4 committed, but behind a running transaction
    assert after.counts.synced == 2
    assert xid_world.emulator.received(1001)[-1] == {"email": "late@example.com"}
    assert xid_world.emulator.received(1004) == [{"email": "user4@example.com"}]


def commit_behind_the_watermark(world: World) -> None:
    """Users 1-3 synced; user 1 changed by a transaction that commits after user 4 was read,
    stamped with its start time: behind the watermark, with no lookback to catch it."""
    world.lookback = timedelta(0)
    world.users.add_users(range(1, 4))
    world.cycle()
    long_tx = open_long_transaction(world.users, 1, "late@example.com")
    world.users.add_users([4])
    world.cycle()
    long_tx.commit()
    long_tx.close()


def test_timestamp_mode_loses_what_commits_behind_a_short_lookback(world: World) -> None:
    """The counter-case: in timestamp mode a transaction longer than the lookback is missed."""
    commit_behind_the_watermark(world)

    world.cycle()

    assert world.emulator.received(1001) == [{"email": "user1@example.com"}]


def test_audit_detects_and_repairs_a_missed_change(world: World) -> None:
    """With a lookback shorter than a long transaction, the audit finds the miss and pushes it."""
    world.audit_rows = 100
    commit_behind_the_watermark(world)

    report = world.cycle()

    assert report.counts.audit_misses == 1
    assert world.emulator.received(1001)[-1] == {"email": "late@example.com"}
    assert world.status(1).status == "synced"
    assert world.cycle().counts.audit_misses == 0


def test_audit_finds_nothing_when_nothing_was_missed(world: World) -> None:
    """On a table the poller kept up with, the audit checks every settled row and finds no miss."""
    world.lookback = timedelta(seconds=1)
    world.audit_rows = 7
    world.users.add_users(range(1, 21), updated_at=datetime(2026, 1, 1, tzinfo=UTC))
    world.users.add_users([21])

    reports = [world.cycle() for _ in range(3)]

    checked = sum(r.counts.audit_checked for r in reports)
    misses = sum(r.counts.audit_misses for r in reports)
    assert misses == 0
    assert checked == 20  # users 1..20 once each; 21 sits at the watermark, in the window
    assert world.state.audit_position() == 21


def test_longest_write_transaction_is_observed_on_a_primary(pg_database: str) -> None:
    """check can see how long the oldest open write transaction on a primary has run."""
    db = UserDb(pg_database)
    db.add_users([1])
    spec = SourceSpec("users", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)
    source = Source(create_engine(pg_database), spec).open()
    idle = source.longest_write_transaction()
    long_tx = open_long_transaction(db, 1, "x@example.com")

    wait_for(lambda: (source.longest_write_transaction() or 0) > 0.3, "the transaction to age")

    long_tx.rollback()
    long_tx.close()
    assert idle == 0.0
    db.dispose()


def test_no_write_transaction_is_visible_from_a_standby(standby_pair) -> None:  # type: ignore[no-untyped-def]
    """A standby cannot see the primary's transactions, and says so rather than guessing 0."""
    primary, standby = standby_pair
    primary.create_database("obs")
    db = UserDb(primary.url("obs"))
    primary.wait_for_replay(standby)
    spec = SourceSpec("users", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)

    observed = Source(create_engine(standby.url("obs")), spec).open().longest_write_transaction()

    assert observed is None
    db.dispose()
    primary.drop_database("obs")


def test_status_shows_the_replica_lag_of_each_run(standby_pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The operator's status view has each run's replay lag beside its counts."""
    from cdc_sync.report import render_status

    primary, standby = standby_pair
    primary.create_database("lagview")
    with World.running(
        primary.url("lagview"), f"sqlite:///{tmp_path}/s.db", read_url=standby.url("lagview")
    ) as world:
        world.users.add_users([1])
        primary.wait_for_replay(standby)
        world.cycle()

        text = render_status(world.state.status_view(), world.clock())

    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("run "))
    header, first_run = lines[at : at + 2]
    lag = first_run[header.index(" lag ") + 1 :].split()[0]  # the cell under the "lag" heading
    assert "audit misses" in header
    assert lag.endswith("s") and float(lag[:-1]) >= 0
    primary.drop_database("lagview")


def test_a_long_transaction_within_the_lookback_is_caught_after_idle_cycles(world: World) -> None:
    """Idle cycles resume after the watermark, yet a transaction stamped before a later read and
    committed within the lookback is read by the next cycle: the window reaches back from time."""
    world.users.add_users(range(1, 4), updated_at=datetime.now(UTC) - timedelta(hours=1))
    engine = world.engine()
    engine.run_cycle()
    idle = engine.run_cycle()
    long_tx = open_long_transaction(world.users, 1, "late@example.com")
    world.users.add_users([4])  # committed and read while user 1's transaction is open
    engine.run_cycle()

    long_tx.commit()
    long_tx.close()
    after = engine.run_cycle()

    assert idle.counts.rows_read == 0
    assert after.counts.synced == 1
    assert world.emulator.received(1001)[-1] == {"email": "late@example.com"}


def test_a_lagging_standby_anchors_the_window_at_its_replay(standby_pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A commit a paused standby had not replayed when a cycle read it is caught by the next
    cycle, though its stamp is older than the standby's clock at that read minus the lookback."""
    primary, standby = standby_pair
    primary.create_database("paused")
    with World.running(
        primary.url("paused"), f"sqlite:///{tmp_path}/s.db", read_url=standby.url("paused")
    ) as world:
        world.lookback = timedelta(seconds=1)
        world.users.add_users(range(1, 4))
        primary.wait_for_replay(standby)
        engine = world.engine()
        engine.run_cycle()
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            # As long a transaction as the lookback allows: stamped 0.9 s before it commits.
            late = func.now() - timedelta(milliseconds=900)
            world.users.change(2, email="late@example.com", updated_at=late)
            with world.users.engine.connect() as connection:
                committed = connection.scalar(select(func.now()))
            assert committed is not None
            with world.source_engine.connect() as connection:
                wait_for(
                    lambda: (
                        connection.scalar(select(func.clock_timestamp()))
                        > committed + timedelta(milliseconds=500)
                    ),
                    "the standby's clock to pass the commit by half a second",
                )
            during = engine.run_cycle()  # the standby has not replayed the change
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
        primary.wait_for_replay(standby)
        after = engine.run_cycle()

        assert during.counts.synced == 0
        assert after.counts.synced == 1
        assert world.emulator.received(1002)[-1] == {"email": "late@example.com"}
    primary.drop_database("paused")
