"""The throwaway PostgreSQL servers behave like the production primary and its read replica."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import sqlalchemy as sa

from cdc_sync.testing.postgres import PostgresServer

Pair = tuple[PostgresServer, PostgresServer]


def test_standby_replays_what_the_primary_commits(standby_pair: Pair) -> None:
    """A row committed on the primary can be read on the standby once it has been replayed."""
    primary, standby = standby_pair
    marker = uuid.uuid4().hex
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS harness_replay (marker text)")
        conn.execute("INSERT INTO harness_replay VALUES (%s)", [marker])

    primary.wait_for_replay(standby)

    with psycopg.connect(standby.dsn()) as conn:
        query = "SELECT count(*) FROM harness_replay WHERE marker = %s"
        found = conn.execute(query, [marker]).fetchone()
    assert found == (1,)


def test_standby_refuses_writes(standby_pair: Pair) -> None:
    """Writing on the standby fails with SQLSTATE 25006, read_only_sql_transaction."""
    _, standby = standby_pair

    with psycopg.connect(standby.dsn()) as conn, pytest.raises(psycopg.Error) as raised:
        conn.execute("CREATE TABLE refused (id int)")

    assert raised.value.sqlstate == "25006"


def test_pg_database_is_fresh_and_independent(postgres: PostgresServer, pg_database: str) -> None:
    """A table made in one test's database is absent from every other database on the server."""
    other = f"t_{uuid.uuid4().hex[:16]}"
    postgres.create_database(other)
    engine, other_engine = sa.create_engine(pg_database), sa.create_engine(postgres.url(other))

    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE mine (id int)"))
        mine, theirs = (
            sa.inspect(engine).get_table_names(),
            sa.inspect(other_engine).get_table_names(),
        )
    finally:
        engine.dispose()
        other_engine.dispose()
        postgres.drop_database(other)

    assert (mine, theirs) == (["mine"], [])


def test_state_url_opens_an_empty_database(state_url: str) -> None:
    """Each state_url backend accepts a connection and starts without tables."""
    engine = sa.create_engine(state_url)

    try:
        tables = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()

    assert tables == []
