"""The source reader against real PostgreSQL and SQLite tables."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from userdb import CONTACT_COLUMNS, UserDb

from cdc_sync.errors import SourceError
from cdc_sync.rules import Position
from cdc_sync.source import Source, SourceSpec, lookback_problem

SPEC = SourceSpec("users", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)
STAMP = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["postgres", "sqlite"])
def users(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[UserDb]:
    url = (
        request.getfixturevalue("pg_database")
        if request.param == "postgres"
        else f"sqlite:///{tmp_path}/app.db"
    )
    db = UserDb(url)
    yield db
    db.dispose()


def source_for(db: UserDb, spec: SourceSpec = SPEC) -> Source:
    return Source(create_engine(db.url), spec)


def read_all(source: Source, size: int) -> list[Any]:
    rows, after = [], None
    while page := source.read_page(after, None, size):
        rows += page
        after = Position(page[-1].cursor, page[-1].key)
    return rows


def test_pages_cover_ties_exactly_once(users: UserDb) -> None:
    """Keyset pages over rows sharing cursor values return each row once, in (cursor, key) order."""
    users.add_users(range(1, 24), updated_at=STAMP)
    users.add_users(range(24, 31), updated_at=STAMP - timedelta(seconds=1))

    rows = read_all(source_for(users), 4)

    assert [r.key for r in rows] == [*range(24, 31), *range(1, 24)]


def test_start_reads_from_a_cursor_value_inclusive(users: UserDb) -> None:
    """A cycle's first page starts at the lookback point, including rows exactly at it."""
    users.add_users([1], updated_at=STAMP - timedelta(minutes=10))
    users.add_users([2], updated_at=STAMP - timedelta(minutes=5))
    users.add_users([3], updated_at=STAMP)

    rows = source_for(users).read_page(None, STAMP - timedelta(minutes=5), 10)

    assert [r.key for r in rows] == [2, 3]


def test_first_page_is_read_page_with_the_horizon(users: UserDb) -> None:
    """A cycle's first page is the same page, in the same order, as a plain read of it."""
    users.add_users(range(1, 9), updated_at=STAMP)
    users.add_users(range(9, 13), updated_at=STAMP - timedelta(seconds=1))
    source = source_for(users)

    for start in (None, STAMP):
        _, rows = source.first_page(None, start, 10)
        assert rows == source.read_page(None, start, 10)
    _, rows = source.first_page(Position(STAMP, 3), None, 10)
    assert [r.key for r in rows] == [4, 5, 6, 7, 8]


def test_first_page_brings_the_source_clock_even_when_empty(pg_database: str) -> None:
    """The horizon comes with an empty page too: the source's clock as the ceiling, and no
    replay lag on a primary."""
    db = UserDb(pg_database)
    db.add_users([1], updated_at=STAMP)
    source = source_for(db)

    horizon, rows = source.first_page(None, STAMP + timedelta(days=1), 10)

    assert rows == []
    assert abs(horizon.ceiling - datetime.now(UTC)) < timedelta(minutes=1)
    assert horizon.replica_lag is None
    assert horizon.ceiling <= source.horizon().ceiling
    db.dispose()


def test_rows_carry_raw_values_by_contact_key(users: UserDb) -> None:
    """A row maps contact keys to the raw column values, NULLs included."""
    users.insert(
        [{"id": 1, "email": "a@b.c", "mobile": " 090 ", "engagelab_euid": 7, "updated_at": STAMP}]
    )

    [row] = source_for(users).read_page(None, None, 10)

    assert (row.key, row.euid) == (1, 7)
    assert row.contacts == {
        "email": "a@b.c",
        "mobile_phone": " 090 ",
        "landline_phone": None,
        "whatsapp_phone": None,
    }


def test_read_keys_returns_current_rows(users: UserDb) -> None:
    """Reading by key returns the rows that exist, typed back from the status table's text."""
    users.add_users(range(1, 6))
    source = source_for(users)

    rows = source.read_keys([source.key_from_text(k) for k in ("2", "4", "99")])

    assert [r.key for r in rows] == [2, 4]


def test_missing_table_names_it(users: UserDb) -> None:
    """A table that does not exist is a SourceError naming it."""
    spec = SourceSpec("people", "id", "updated_at", "engagelab_euid", CONTACT_COLUMNS)

    with pytest.raises(SourceError, match="the source table people does not exist"):
        source_for(users, spec).open()


def test_missing_column_names_it_and_lists_the_real_ones(users: UserDb) -> None:
    """A column that does not exist is named, with the columns that do."""
    spec = SourceSpec("users", "id", "modified", "engagelab_euid", {"email": "mail"})

    with pytest.raises(SourceError) as error:
        source_for(users, spec).open()

    assert "has no column modified, mail" in str(error.value)
    assert "updated_at" in error.value.hint


def test_cursor_index_is_found(users: UserDb) -> None:
    """The (cursor, key) index is recognised by its columns."""
    assert source_for(users).index_advice().present == "users_updated_at_id_idx"


def test_missing_index_gets_a_create_statement(pg_database: str) -> None:
    """Without the index, check has the statement to create it, concurrently on PostgreSQL."""
    db = UserDb(pg_database, index=False)
    source = source_for(db)

    advice = source.index_advice()

    assert advice.present is None
    assert advice.statements == (
        "CREATE INDEX CONCURRENTLY users_updated_at_id_idx ON users (updated_at, id);",
    )
    db.dispose()


def recorded_statements(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.strip().split()[0].upper())

    return seen


def test_source_only_reads_on_read_only_sessions(pg_database: str) -> None:
    """The reader sends nothing but SELECTs, on sessions where a write would be refused."""
    db = UserDb(pg_database)
    db.add_users(range(1, 10))
    engine = create_engine(pg_database)
    seen = recorded_statements(engine)
    source = Source(engine, SPEC).open()

    read_all(source, 3)
    source.read_keys([1, 2])
    source.horizon()

    assert set(seen) == {"SELECT"}
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "30s"
        with pytest.raises(DBAPIError, match="read-only transaction"):
            connection.exec_driver_sql("UPDATE users SET name = 'x'")
    db.dispose()


def test_statement_timeout_cancels_a_slow_read(pg_database: str) -> None:
    """A source query slower than statement_timeout is cancelled and reported, not waited on."""
    db = UserDb(pg_database)
    db.add_users(range(1, 3))
    with db.engine.begin() as connection:
        connection.execute(
            text("CREATE VIEW slow_users AS SELECT u.* FROM users u, LATERAL pg_sleep(2)")
        )
    spec = SourceSpec(
        "slow_users",
        "id",
        "updated_at",
        "engagelab_euid",
        CONTACT_COLUMNS,
        statement_timeout=timedelta(milliseconds=200),
    )

    with pytest.raises(SourceError, match="statement timeout"):
        source_for(db, spec).read_page(None, None, 10)
    db.dispose()


@pytest.mark.parametrize(
    ("lookback", "kind", "given", "problem"),
    [
        (timedelta(minutes=5), datetime, True, None),
        (0, datetime, True, None),
        (1000, int, True, None),
        (timedelta(0), Decimal, True, None),
        (300, datetime, True, "300 is a number of cursor units, but the cursor c is a t; "),
        (timedelta(minutes=5), int, True, "5m is a duration, but the cursor c is a t, counted "),
        (timedelta(minutes=5), Decimal, False, "not set, and its default (5m) is a duration, "),
    ],
)
def test_lookback_problem_speaks_config(
    lookback: Any, kind: type, given: bool, problem: str | None
) -> None:
    """A lookback of the wrong kind for the cursor is named as the config file writes it."""
    found = lookback_problem(lookback, "c", kind, "t", given=given)

    assert found == problem if problem is None else (found or "").startswith(problem)
