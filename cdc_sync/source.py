"""The source: the application's user table on a read replica, read in keyset pages.

:func:`page_query` plans a page (pure); :class:`Source` runs it, each page in its own short
read-only transaction, and never writes. Pages are ordered by ``(cursor, key)`` and resumed with a
row-value comparison, so rows sharing a cursor value are neither lost nor read twice within a cycle.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Column, Engine, MetaData, Select, Table, inspect, select, tuple_
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from cdc_sync.errors import SourceError
from cdc_sync.mapping import SourceRow
from cdc_sync.rules import Position


@dataclass(frozen=True)
class SourceSpec:
    """Which table and columns to read; ``contacts`` maps EngageLab contact key → column."""

    table: str
    key: str
    cursor: str
    euid: str
    contacts: Mapping[str, str]
    schema: str | None = None
    statement_timeout: timedelta = timedelta(seconds=30)

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def columns(self) -> list[str]:
        """Every column read, each once, in a stable order."""
        names = [self.key, self.cursor, self.euid, *self.contacts.values()]
        return list(dict.fromkeys(names))


def page_query(
    table: Table, spec: SourceSpec, after: Position | None, start: Any, limit: int
) -> Select[Any]:
    """One page: rows after ``after`` in (cursor, key) order, or from cursor ``start``.

    ``after`` resumes within a cycle (strictly greater, row-value comparison so an index on
    ``(cursor, key)`` serves it as one range scan). ``start`` opens a cycle at the watermark
    minus the lookback (inclusive, since rows at that cursor may have committed late).
    """
    cursor, key = table.c[spec.cursor], table.c[spec.key]
    query = select(*(table.c[name] for name in spec.columns())).order_by(cursor, key).limit(limit)
    if after is not None:
        return query.where(tuple_(cursor, key) > tuple_(after.cursor, after.key))
    if start is not None:
        return query.where(cursor >= start)
    return query


def lookback_start(watermark: Position | None, lookback: timedelta | int) -> Any:
    """Where a cycle starts: ``lookback`` before the watermark's cursor (None: the top)."""
    if watermark is None:
        return None
    cursor = watermark.cursor
    if isinstance(cursor, datetime | date) and isinstance(lookback, timedelta):
        return cursor - lookback
    if isinstance(cursor, int) and isinstance(lookback, int):
        return cursor - lookback
    raise SourceError(
        f"source.lookback {lookback!r} does not fit a cursor of type {type(cursor).__name__}",
        "use a duration (e.g. 5m) for a timestamp cursor and a whole number for a numeric one",
    )


class Source:
    """Reads the configured table; reflects it once on :meth:`open`."""

    def __init__(self, engine: Engine, spec: SourceSpec) -> None:
        self.engine = engine
        self.spec = spec
        self._table: Table | None = None

    @property
    def table(self) -> Table:
        if self._table is None:
            self._table = self._reflect()
        return self._table

    def open(self) -> Source:
        """Reflect the table; :class:`SourceError` unless every configured column exists."""
        _ = self.table
        return self

    def _reflect(self) -> Table:
        spec = self.spec
        try:
            table = Table(spec.table, MetaData(), schema=spec.schema, autoload_with=self.engine)
        except NoSuchTableError:
            raise SourceError(
                f"the source table {spec.qualified_table} does not exist in {self._where()}",
                "check source.table and source.schema, and that the user may see the table",
            ) from None
        except SQLAlchemyError as exc:
            raise self._failure(exc) from exc
        missing = [name for name in spec.columns() if name not in table.c]
        if missing:
            raise SourceError(
                f"the source table {spec.qualified_table} has no column {', '.join(missing)}",
                f"its columns are: {', '.join(table.c.keys())}",
            )
        return table

    def read_page(self, after: Position | None, start: Any, limit: int) -> list[SourceRow]:
        return self._read(page_query(self.table, self.spec, after, start, limit))

    def read_keys(self, keys: Sequence[Any]) -> list[SourceRow]:
        """The current rows of these keys (those that still exist)."""
        if not keys:
            return []
        column = self.table.c[self.spec.key]
        query = select(*(self.table.c[n] for n in self.spec.columns())).where(column.in_(keys))
        return self._read(query.order_by(column))

    def key_from_text(self, text: str) -> Any:
        """A key as stored in the status table (text) back in the source column's type."""
        kind = _python_type(self.table.c[self.spec.key])
        if kind is int:
            return int(text)
        if kind is uuid.UUID:
            return uuid.UUID(text)
        return text

    def _read(self, query: Select[Any]) -> list[SourceRow]:
        spec = self.spec
        try:
            with self.engine.connect() as connection, connection.begin():
                if self.engine.dialect.name == "postgresql":
                    millis = int(spec.statement_timeout.total_seconds() * 1000)
                    connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                    connection.exec_driver_sql(f"SET LOCAL statement_timeout = {millis}")
                rows = connection.execute(query).all()
        except SQLAlchemyError as exc:
            raise self._failure(exc) from exc
        return [
            SourceRow(
                key=row._mapping[spec.key],
                cursor=row._mapping[spec.cursor],
                euid=row._mapping[spec.euid],
                contacts={k: row._mapping[col] for k, col in spec.contacts.items()},
            )
            for row in rows
        ]

    # -- what `cdc-sync check` reports ------------------------------------------------------

    def cursor_index(self) -> str | None:
        """The name of an index whose leading columns are (cursor, key), if there is one."""
        wanted = [self.spec.cursor, self.spec.key]
        for index in inspect(self.engine).get_indexes(self.spec.table, schema=self.spec.schema):
            if list(index["column_names"][:2]) == wanted:
                return index["name"]
        return None

    def index_statement(self) -> str:
        s = self.spec
        name = f"{s.table}_{s.cursor}_{s.key}_idx"
        on = f"{s.qualified_table} ({s.cursor}, {s.key})"
        if self.engine.dialect.name == "postgresql":
            return f"CREATE INDEX CONCURRENTLY {name} ON {on};"
        return f"CREATE INDEX {name} ON {on};"

    def _failure(self, exc: SQLAlchemyError) -> SourceError:
        text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return SourceError(
            f"reading the source {self._where()} failed: {text[0] if text else type(exc).__name__}",
            "check source.url, that the server is up, and that the user may read the table",
        )

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


def _python_type(column: Column[Any]) -> type | None:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None
