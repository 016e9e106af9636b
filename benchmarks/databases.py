"""The databases of a benchmark: source databases holding a ``users`` table, tracking databases,
and what the tracking tables say, read with plain SQL (cdc-sync's own modules are not imported,
so their changes cannot break the reading)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import create_engine, text

from cdc_sync.testing.postgres import PostgresServer

ROW_SPACING_S = 30  # seconds between two users' updated_at: 1M users span ~347 days
INDEX_NAME = "users_updated_at_id_idx"


class Databases:
    """Fresh databases on the one throwaway server: sources (``users``) and tracking databases."""

    def __init__(self, server: PostgresServer, scratch: Path, state_kind: str) -> None:
        self.server = server
        self.scratch = scratch
        self.state_kind = state_kind
        self._count = 0
        self._anchors: dict[str, datetime] = {}

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def users(self, rows: int, ids: range | None = None) -> str:
        """A new source database holding ``rows`` users, each with a changed (never pushed) email.

        Loaded server-side (``INSERT ... SELECT generate_series``), then ``VACUUM ANALYZE`` gives
        the planner what autovacuum would; the (updated_at, id) index is built after the load.
        ``updated_at`` runs ``ROW_SPACING_S`` apart and ends an hour ago, so the 5-minute lookback
        of an idle cycle re-reads ~10 rows, as on a table where a few users change per minute.
        ``ids`` loads only some of the users (the rest can follow with :meth:`add_users`).
        """
        name = self._name("src")
        self.server.create_database(name)
        url = self.server.url(name)
        self._anchors[url] = datetime.now(UTC) - timedelta(hours=1)
        with psycopg.connect(self.source_dsn(url), autocommit=True) as conn:
            conn.execute(
                """
                CREATE TABLE users (
                    id bigint PRIMARY KEY,
                    name text,
                    email text,
                    mobile text,
                    landline text,
                    whatsapp text,
                    engagelab_euid bigint,
                    updated_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
        self.add_users(url, rows, ids if ids is not None else range(1, rows + 1))
        with psycopg.connect(self.source_dsn(url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE INDEX {} ON users (updated_at, id)").format(
                    sql.Identifier(INDEX_NAME)
                )
            )
        return url

    def add_users(self, url: str, rows: int, ids: range, *, now: bool = False) -> None:
        """Insert users ``ids`` of a ``rows``-user table made by :meth:`users`, then analyze.

        ``now``: stamped with the server's clock instead, as an application writing them now
        (changes a running daemon will find after its watermark).
        """
        stamp = sql.SQL("{anchor} - ({rows} - i) * {spacing} * interval '1 second'").format(
            anchor=sql.Literal(self._anchors[url]),
            rows=sql.Literal(rows),
            spacing=sql.Literal(ROW_SPACING_S),
        )
        insert = sql.SQL(
            """
            INSERT INTO users (id, name, email, engagelab_euid, updated_at)
            SELECT i, 'user ' || i, 'user' || i || '@example.com', 1000 + i, {stamp}
            FROM generate_series({first}, {last}) AS i
            """
        ).format(
            stamp=sql.SQL("now()") if now else stamp,
            first=sql.Literal(ids.start),
            last=sql.Literal(ids.stop - 1),
        )
        with psycopg.connect(self.source_dsn(url), autocommit=True) as conn:
            conn.execute(insert)
            conn.execute("VACUUM ANALYZE users")

    def state(self) -> str:
        """A new, empty tracking database: PostgreSQL on the same server, or a SQLite file."""
        name = self._name("state")
        if self.state_kind == "sqlite":
            return f"sqlite:///{self.scratch / name}.db"
        self.server.create_database(name)
        return self.server.url(name)

    def source_dsn(self, url: str) -> str:
        """The libpq conninfo of a source database URL made by :meth:`users`."""
        return self.server.dsn(url.rsplit("/", 1)[1])


# -- the tracking tables, read with plain SQL ---------------------------------------------------


def _as_datetime(value: Any) -> datetime:
    """A timestamp from PostgreSQL (datetime) or SQLite (ISO text)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class RunRow:
    """One row of ``cdc_sync_runs``: a cycle as the engine recorded it."""

    started_at: datetime
    finished_at: datetime
    outcome: str
    rows_read: int
    pushed: int

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at) / timedelta(seconds=1)


def _query(state_url: str, sql: str, **params: Any) -> list[Any]:
    """The rows of one query on the tracking database, on a connection of its own."""
    engine = create_engine(state_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def recent_runs(state_url: str, limit: int) -> list[RunRow]:
    """The last ``limit`` finished cycles, oldest first."""
    rows = _query(
        state_url,
        "SELECT started_at, finished_at, outcome, rows_read, synced "
        "FROM cdc_sync_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT :n",
        n=limit,
    )
    return [
        RunRow(_as_datetime(r[0]), _as_datetime(r[1]), r[2], int(r[3]), int(r[4]))
        for r in reversed(rows)
    ]


def run_count(state_url: str) -> int:
    """How many cycles ``cdc_sync_runs`` holds as finished."""
    [(count,)] = _query(
        state_url, "SELECT count(*) FROM cdc_sync_runs WHERE finished_at IS NOT NULL"
    )
    return int(count or 0)


def status_counts(state_url: str) -> dict[str, int]:
    """Users per status in ``cdc_sync_status``."""
    rows = _query(state_url, "SELECT status, count(*) FROM cdc_sync_status GROUP BY status")
    return {str(status): int(count) for status, count in rows}


def watermark(state_url: str) -> tuple[datetime, int] | None:
    """The stored watermark (``datetime:<iso>``, ``int:<id>``), or None if absent or unreadable."""
    rows = _query(state_url, "SELECT cursor_value, key_value FROM cdc_sync_state")
    cursor, key = rows[0] if rows else (None, None)
    if not (isinstance(cursor, str) and cursor.startswith("datetime:")):
        return None
    if not (isinstance(key, str) and key.startswith("int:")):
        return None
    return datetime.fromisoformat(cursor.removeprefix("datetime:")), int(key.removeprefix("int:"))
