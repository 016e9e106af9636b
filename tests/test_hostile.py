"""Hostile rows and answers: each bad value becomes that user's recorded outcome with a reason,
never the page's exception; the good rows around it sync in the same cycle."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import World
from sqlalchemy import create_engine

from cdc_sync.emulator import Faults
from cdc_sync.errors import SourceError
from cdc_sync.mapping import Payload, Policy, Skip, map_row, status_key
from cdc_sync.rules import Position
from cdc_sync.source import Source, SourceSpec


@dataclass(frozen=True)
class Sql:
    """A value written as an SQL expression, for what no Python value can bind."""

    text: str


@dataclass(frozen=True)
class Hostile:
    """One hostile row: what it holds, what the API answers for it, and what gets recorded."""

    name: str
    values: dict[str, Any]  # column → value (euid defaults to a valid one, email to a good one)
    status: str
    message: str
    code: int | None = None
    answer: tuple[int, str] | None = None  # the API's scripted answer for this row's euid
    key: Any = None  # the key as read back, when it is not the row's own
    sent: dict[str, str] | None = None  # what EngageLab holds afterwards, when pushed


# Add a row here: it is written among 1,000 good rows (the last one last) and must come out as
# stated.
HOSTILE = [
    Hostile("euid +-5", {"engagelab_euid": "+-5"}, "skipped", "euid '+-5' is not an integer"),
    Hostile(
        "euid 1e30",
        {"engagelab_euid": 1e30},
        "skipped",
        "euid of more than 30 digits does not fit in 64 bits",
    ),
    Hostile(
        "euid Infinity",
        {"engagelab_euid": "Infinity"},
        "skipped",
        "euid 'Infinity' is not an integer",
    ),
    Hostile("euid inf", {"engagelab_euid": float("inf")}, "skipped", "euid inf is not an integer"),
    Hostile(
        "key of 300 characters",
        {"id": "k" * 300},
        "skipped",
        "the source key is 300 characters long, more than 256: "
        "recorded under its SHA-256 digest, not pushed",
    ),
    Hostile(
        "email not UTF-8",
        {"email": Sql("CAST(X'61FF62' AS TEXT)")},
        "skipped",
        "contact email is not valid UTF-8 text",
    ),
    Hostile(
        "email a BLOB not UTF-8",
        {"email": Sql("X'FF'")},
        "skipped",
        "contact email is not valid UTF-8 text",
    ),
    Hostile(
        "email with a NUL",
        {"email": Sql("CAST(X'610062' AS TEXT)")},
        "skipped",
        "contact email holds a NUL character",
    ),
    Hostile(
        "phone a whole float",
        {"mobile": 8613900000001.0},
        "synced",
        "success",
        code=0,
        sent={"mobile_phone": "8613900000001"},
    ),
    Hostile(
        "phone a fractional float",
        {"mobile": 8613900000001.5},
        "skipped",
        "contact mobile_phone is a fractional number",
    ),
    Hostile(
        "code 3e9",
        {},
        "failed",
        "code 3000000000: too big",
        answer=(400, '{"code": 3000000000, "message": "too big"}'),
    ),
    Hostile(
        "code 1e20",
        {},
        "failed",
        "code 100000000000000000000: failed",
        answer=(400, '{"code": 100000000000000000000, "message": "failed"}'),
    ),
    Hostile(
        "message with a NUL",
        {},
        "failed",
        "bad\ufffdvalue",
        code=55004,
        answer=(400, '{"code": 55004, "message": "bad\\u0000value"}'),
    ),
    Hostile(
        "message with a lone surrogate",
        {},
        "failed",
        "bad\ufffdvalue",
        code=55004,
        answer=(400, '{"code": 55004, "message": "bad\\ud800value"}'),
    ),
    Hostile(
        "message echoing the email",
        {},
        "failed",
        "invalid contact value: <email>",
        code=55004,
        answer=(400, '{"code": 55004, "message": "invalid contact value: {email}"}'),
    ),
    Hostile(  # outside the keyset scan's reach: swept by key in the same cycle
        "cursor NULL",
        {"updated_at": None},
        "synced",
        "success",
        code=0,
        sent={},
    ),
    Hostile(  # last in the table: the watermark ends on a key holding a NUL
        "key with a NUL",
        {"id": Sql("CAST(X'7A7A00' AS TEXT)")},
        "skipped",
        "the source key holds a NUL character or text that is not UTF-8: "
        "recorded under its SHA-256 digest, not pushed",
        key="zz\x00",
    ),
]
GOOD = 1000

# Columns without a type: SQLite keeps each value as written (TEXT, REAL, BLOB), which lets one
# table hold every hostile value a typed column of some database could return.
HOSTILE_TABLE = """
CREATE TABLE users (id TEXT PRIMARY KEY, name, email, mobile, landline, whatsapp,
                    engagelab_euid, updated_at INTEGER)
"""


def write_hostile_table(path: Path) -> None:
    rows = [
        {"id": f"g{i:04}", "email": f"good{i}@example.com", "engagelab_euid": 2000 + i}
        for i in range(GOOD)
    ]
    for n, hostile in enumerate(HOSTILE):
        row = {"id": f"h{n:02}", "email": f"hostile{n}@example.com", "engagelab_euid": 5000 + n}
        last = n == len(HOSTILE) - 1
        rows.insert(len(rows) if last else n * 60 + 30, row | hostile.values)  # over the pages
    with sqlite3.connect(path) as connection:
        connection.execute(HOSTILE_TABLE)
        for cursor, row in enumerate(rows, start=1):
            row = {"updated_at": cursor} | row
            columns = ", ".join(row)
            marks = ", ".join(v.text if isinstance(v, Sql) else "?" for v in row.values())
            connection.execute(
                f"INSERT INTO users ({columns}) VALUES ({marks})",  # noqa: S608 -- test data
                [v for v in row.values() if not isinstance(v, Sql)],
            )


@pytest.fixture
def hostile(tmp_path: Path, state_url: str) -> Iterator[World]:
    """A SQLite source with every hostile row among good ones, and a world over it."""
    source = tmp_path / "source.db"
    write_hostile_table(source)
    with World.running(f"sqlite:///{source}", state_url) as world:
        world.lookback = 0  # an integer cursor
        world.batch_size = 500
        answers = {5000 + n: h.answer for n, h in enumerate(HOSTILE) if h.answer is not None}
        world.emulator.set_faults(Faults(answers=answers))
        yield world


def test_every_hostile_row_is_recorded_and_every_good_one_synced_in_one_cycle(
    hostile: World,
) -> None:
    """A table of 1,000 good rows and every hostile row: one cycle syncs each good row, records
    each hostile one with its reason, and moves the watermark to the end (once: a traceback or
    exit 69 on every run, nothing recorded)."""
    report = hostile.cycle()

    assert report.outcome == "ok"
    held = hostile.emulator.contacts
    assert all(held[2000 + i] == {"email": f"good{i}@example.com"} for i in range(GOOD))
    for n, case in enumerate(HOSTILE):
        key = case.key if case.key is not None else case.values.get("id", f"h{n:02}")
        row = hostile.state.status_of(status_key(key)[0])
        assert row is not None, case.name
        got = (row.status, row.last_code, row.last_message)
        assert got == (case.status, case.code, case.message), case.name
        if case.sent is not None:
            assert held[5000 + n] == {"email": f"hostile{n}@example.com", **case.sent}
    assert report.counts.rows_read == GOOD + len(HOSTILE)
    assert report.watermark_after is not None
    assert report.watermark_after.key == "zz\x00"
    assert hostile.state.watermark() == report.watermark_after


def test_a_hostile_table_settles_after_one_cycle(hostile: World) -> None:
    """After the cycle that recorded them, hostile rows cost no request and no write."""
    hostile.cycle()
    before = hostile.requests()

    again = hostile.cycle()

    assert hostile.requests() == before
    assert (again.counts.synced, again.counts.failed, again.counts.skipped) == (0, 0, 0)


def test_a_key_that_is_not_utf8_stops_with_a_message_that_quotes_nothing(tmp_path: Path) -> None:
    """A SQLite key that is not UTF-8 cannot be read past by key: the read stops with a message
    naming the column and the fix, never the value."""
    path = tmp_path / "source.db"
    with sqlite3.connect(path) as connection:
        connection.execute(HOSTILE_TABLE)
        connection.execute(
            "INSERT INTO users (id, email, engagelab_euid, updated_at) "
            "VALUES (CAST(X'61FF62' AS TEXT), 'secret@example.com', 1, 1)"
        )
    spec = SourceSpec("users", "id", "updated_at", "engagelab_euid", {"email": "email"})
    source = Source(create_engine(f"sqlite:///{path}"), spec)
    [row] = source.read_page(None, None, 10)

    with pytest.raises(SourceError) as stopped:
        source.read_page(Position(row.cursor, row.key), None, 10)

    assert "not valid UTF-8" in str(stopped.value) and "id" in str(stopped.value)
    assert "a\udcffb" not in str(stopped.value) and "secret" not in str(stopped.value)
    source.engine.dispose()


PG_TABLE = """
CREATE TABLE users (id bigint PRIMARY KEY, name text, email text, mobile double precision,
                    landline numeric, whatsapp text, engagelab_euid numeric,
                    updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO users (id, email, mobile, landline, engagelab_euid) VALUES
  (1, 'a1@example.com', NULL, NULL, 1e30),
  (2, 'a2@example.com', NULL, NULL, 'Infinity'),
  (3, 'a3@example.com', NULL, NULL, 'NaN'),
  (4, 'a4@example.com', NULL, NULL, 12.5),
  (5, NULL, 8613900000001, 8613900000002.000, 1005),
  (6, 'a6@example.com', 8613900000001.5, NULL, 1006),
  (7, 'a7@example.com', 'NaN', NULL, 1007),
  (8, 'a8@example.com', NULL, 'Infinity', 1008),
  (9, 'a9@example.com', NULL, NULL, 1009);
"""


def test_numeric_euids_and_float_phones_on_postgresql(pg_database: str, state_url: str) -> None:
    """numeric euids of 1e30, Infinity, NaN or 12.5 are skipped with their reason (once
    InvalidOperation on every run); a whole double precision or numeric phone is sent as an
    integer (once "8613900000001.0"), a fractional or NaN one skips its row."""
    with create_engine(pg_database).begin() as connection:
        connection.exec_driver_sql(PG_TABLE)
    with World.running(pg_database, state_url) as world:
        report = world.cycle()

        messages = {i: world.status(i).last_message for i in range(1, 10)}

    assert report.outcome == "ok"
    assert world.emulator.contacts == {
        1005: {"mobile_phone": "8613900000001", "landline_phone": "8613900000002"},
        1009: {"email": "a9@example.com"},
    }
    assert messages == {
        1: "euid Decimal('1000000000000000000000000000... does not fit in 64 bits",
        2: "euid Decimal('Infinity') is not an integer",
        3: "euid Decimal('NaN') is not an integer",
        4: "euid Decimal('12.5') is not an integer",
        5: "success",
        6: "contact mobile_phone is a fractional number",
        7: "contact mobile_phone is not a finite number",
        8: "contact landline_phone is not a finite number",
        9: "success",
    }


@pytest.mark.parametrize(
    ("kind", "literal", "sent", "reason"),
    [
        ("bigint", "8613900000001", "8613900000001", None),
        ("numeric(20, 2)", "8613900000001.00", "8613900000001", None),
        ("real", "1.5", None, "contact mobile_phone is a fractional number"),
        ("double precision", "'-Infinity'", None, "contact mobile_phone is not a finite number"),
        ("varchar(20)", "' +8190 '", "+8190", None),
        ("boolean", "true", None, "contact mobile_phone is a boolean, not text or a number"),
        ("bytea", "'\\x2b38313930'", "+8190", None),
        ("bytea", "'\\xff'", None, "contact mobile_phone is not valid UTF-8 text"),
        (
            "date",
            "'2026-01-01'",
            None,
            "contact mobile_phone is of type date, not text or a number",
        ),
        (
            "timestamptz",
            "now()",
            None,
            "contact mobile_phone is of type datetime, not text or a number",
        ),
        (
            "uuid",
            "gen_random_uuid()",
            None,
            "contact mobile_phone is of type UUID, not text or a number",
        ),
        (
            "jsonb",
            "'{\"a\": 1}'",
            None,
            "contact mobile_phone is of type dict, not text or a number",
        ),
        ("jsonb", "'\"+8190\"'", "+8190", None),  # a JSON string is text
        ("json", "'8190'", "8190", None),
        (
            "text[]",
            "ARRAY['+8190']",
            None,
            "contact mobile_phone is of type list, not text or a number",
        ),
        (
            "inet",
            "'10.0.0.1'",
            None,
            "contact mobile_phone is of type IPv4Address, not text or a number",
        ),
        (
            "interval",
            "'1 day'",
            None,
            "contact mobile_phone is of type timedelta, not text or a number",
        ),
    ],
)
def test_every_postgresql_column_type_maps_to_text_or_a_reason(
    pg_database: str, kind: str, literal: str, sent: str | None, reason: str | None
) -> None:
    """What psycopg returns for a contact column of each PostgreSQL type is sent as text or
    refused with a reason naming the contact."""
    engine = create_engine(pg_database)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE users (id bigint PRIMARY KEY, updated_at timestamptz DEFAULT now(), "
            f"engagelab_euid bigint, mobile {kind})"
        )
        insert = f"INSERT INTO users (id, engagelab_euid, mobile) VALUES (1, 7, {literal})"  # noqa: S608
        connection.exec_driver_sql(insert)  # the test's own literals, no outside input
    spec = SourceSpec("users", "id", "updated_at", "engagelab_euid", {"mobile_phone": "mobile"})
    [row] = Source(engine, spec).read_page(None, None, 10)
    engine.dispose()

    result = map_row(row, Policy("s")).result

    if sent is not None:
        assert result == Payload(7, {"mobile_phone": sent})
    else:
        assert result == Skip(reason or "", 7)
