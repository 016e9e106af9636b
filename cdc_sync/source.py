"""The source: the application's user table on a read replica, read in keyset pages.

:func:`page_query` plans a page (pure); :class:`Source` runs it, each page in its own short
transaction on a read-only session, and never writes. Pages are ordered by ``(cursor, key)`` and
resumed with a row-value comparison, so rows sharing a cursor value are neither lost nor read
twice within a cycle.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Dialect,
    Engine,
    MetaData,
    Select,
    Table,
    Text,
    bindparam,
    case,
    cast,
    event,
    func,
    inspect,
    literal_column,
    null,
    select,
    text,
    true,
    tuple_,
    type_coerce,
)
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.exc import DBAPIError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable
from sqlalchemy.types import UserDefinedType

from cdc_sync.dburls import mask_password
from cdc_sync.durations import format_duration
from cdc_sync.errors import SourceError, Stopped, first_line
from cdc_sync.mapping import SourceRow
from cdc_sync.rules import Position

log = structlog.get_logger("cdc_sync.source")

# SQLSTATEs worth a fresh transaction: a hot standby cancels queries that conflict with replay
# (40001), a deadlock victim (40P01), and the server going away or restarting (08xxx, 57P0x).
# A statement timeout (57014) is not retried: the query is slow, and would be slow again.
RETRYABLE_STATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
READ_ATTEMPTS = 4
_UNSTOPPED = threading.Event()  # the stop of a read nobody stops (check, tests): never set


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type, read and bound as a Python int."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any]:
        return lambda value: None if value is None else str(value)

    def bind_expression(self, bindvalue: Any) -> Any:
        # xid8 has no comparison with integers and no binary input from psycopg: send text, cast.
        return cast(type_coerce(bindvalue, Text), self)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any]:
        return lambda value: None if value is None else int(value)


ischema_names.setdefault("xid8", Xid8)  # reflect xid8 columns as Xid8, not as an unknown type


@dataclass(frozen=True, slots=True)
class Horizon:
    """What the source says at the start of a cycle.

    ``ceiling``: the source's clock in the cursor column's type; the watermark never passes it,
    so a row stamped by a clock running ahead cannot carry the watermark past rows that are not
    visible yet. ``replica_lag``: seconds the replica is behind its primary (0 when caught up,
    None when the source is not a replica). ``seen``: the time up to which every commit is
    visible to this read, for a ``timestamptz`` cursor (see :func:`cdc_sync.rules.reread_from`):
    the clock on a primary; on a standby how far replay had got, not its wall clock, or, when
    it had replayed everything its primary last reported, when the primary reported it (so a
    primary gone quiet does not hold it back). None where unknown.
    """

    ceiling: Any = None
    replica_lag: float | None = None
    seen: Any = None


@dataclass(frozen=True, slots=True)
class IndexAdvice:
    """What ``check`` says of the index behind the poll: the index (or indexes) that serve it,
    else the statements that would create one; ``note`` explains a table that needs more."""

    present: str | None
    statements: tuple[str, ...]
    note: str | None


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """What ``cdc-sync check`` reports of the source, gathered by :meth:`Source.facts`."""

    url: str  # password hidden
    index: IndexAdvice
    horizon: Horizon
    longest_transaction: float | None  # seconds; None where it cannot be seen
    cursor_type: str = ""  # as the database names it
    nullable: bool = False
    null_rows: int = 0
    infinite_rows: int = 0
    reach_fix: tuple[str, ...] = ()  # statements that bring every row into the cursor's reach
    ahead_rows: int = 0  # rows stamped ahead of the source's clock now
    ahead_by_s: float | None = None  # how far the furthest of them is ahead

    @property
    def zoneless(self) -> bool:
        return self.cursor_type == "timestamp without time zone"


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
    cursor_mode: str = "timestamp"  # or "xid8": gap-free, see page_query
    consent: str | None = None  # a column that is true while the user consents
    deleted: str | None = None  # a column that is set (not NULL) once the user is deleted

    @property
    def gap_free(self) -> bool:
        return self.cursor_mode == "xid8"

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def columns(self) -> list[str]:
        """Every column read, each once, in a stable order."""
        names = [self.key, self.cursor, self.euid, *self.contacts.values()]
        names += [name for name in (self.consent, self.deleted) if name is not None]
        return list(dict.fromkeys(names))


def read_columns(
    table: Table, spec: SourceSpec, cursor: ColumnElement[Any] | None = None
) -> Select[Any]:
    """``SELECT`` of ``spec.columns()``, in that order: every read's rows are built by position.

    ``cursor`` replaces the cursor column (labelled as it): reads by key select it so that an
    infinite timestamp, which psycopg cannot load into a datetime, comes back as None.
    """
    columns = [table.c[name] for name in spec.columns()]
    if cursor is not None:
        at = spec.columns().index(spec.cursor)
        columns[at] = cursor.label(spec.cursor)  # type: ignore[call-overload]
    return select(*columns)


def infinities(column: Column[Any]) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """``'infinity'`` and ``'-infinity'`` in a PostgreSQL date or timestamp column's type."""
    return (
        cast(literal_column("'infinity'"), column.type),
        cast(literal_column("'-infinity'"), column.type),
    )


def out_of_reach(table: Table, spec: SourceSpec, *, infinite: bool) -> ColumnElement[bool]:
    """Rows the keyset scan cannot order or resume from, which are read by key instead
    (:meth:`Source.read_by_key`): a NULL cursor, or (``infinite``: a PostgreSQL date or
    timestamp) ``±infinity``. :func:`page_query` leaves them out."""
    cursor = table.c[spec.cursor]
    if not infinite:
        return cursor.is_(None)
    return cursor.is_(None) | cursor.in_(infinities(cursor))


def page_query(
    table: Table,
    spec: SourceSpec,
    *,
    after: bool,
    start: bool,
    limit: int,
    infinite: bool = False,
) -> Select[Any]:
    """One page in (cursor, key) order: rows after a position, or from a cursor value.

    ``after`` resumes within a cycle, from the bound parameters ``after_cursor`` and
    ``after_key`` (strictly greater, a row-value comparison, so an index on ``(cursor, key)``
    serves it as one range scan). ``start`` opens a cycle at the watermark minus the lookback,
    from the parameter ``start`` (inclusive, since rows at that cursor may have committed late).
    Neither: from the top. Values are bound at execution, so a statement is built once and its
    compiled form reused (see :func:`page_params`).

    In xid8 mode only rows written by transactions older than the oldest one still running are
    read: no transaction that commits later can have a smaller id, so nothing lands behind.

    Rows whose cursor is NULL, or (``infinite``) ``±infinity``, have no place in the order that
    a watermark could pass: they are left out here and read by key (:func:`out_of_reach`).
    """
    cursor, key = table.c[spec.cursor], table.c[spec.key]
    query = read_columns(table, spec).order_by(cursor, key).limit(limit)
    if infinite:
        top, bottom = infinities(cursor)
        query = query.where(cursor < top)
        if not (after or start):
            query = query.where(cursor > bottom)
    elif not (after or start):
        query = query.where(cursor.is_not(None))
    if spec.gap_free:
        query = query.where(cursor < func.pg_snapshot_xmin(func.pg_current_snapshot()))
    if after:
        # Typed like the columns (tuple_ would guess from the Python values).
        bound = tuple_(
            bindparam("after_cursor", type_=cursor.type), bindparam("after_key", type_=key.type)
        )
        return query.where(tuple_(cursor, key) > bound)
    if start:
        return query.where(cursor >= bindparam("start", type_=cursor.type))
    return query


def page_params(after: Position | None, start: Any) -> dict[str, Any]:
    """The parameters of the :func:`page_query` shape that ``after`` and ``start`` call for."""
    if after is not None:
        return {"after_cursor": after.cursor, "after_key": after.key}
    if start is not None:
        return {"start": start}
    return {}


def lookback_problem(
    lookback: timedelta | int, cursor: str, kind: type | None, type_name: str, *, given: bool
) -> str | None:
    """Why ``lookback`` does not fit a cursor column whose values are of Python type ``kind``
    (``type_name`` as PostgreSQL names it), in the words of the config file; None if it fits.

    A duration only fits a timestamp or date cursor, a bare whole number only a numeric one
    (``0``, "off", fits both). The default, ``5m``, is a duration: a numeric cursor needs
    ``source.lookback`` set, since no number of its units means the same on every table.
    """
    temporal = kind in (datetime, date)
    numeric = kind in (int, Decimal, float)
    if temporal and isinstance(lookback, int) and lookback:
        return (
            f"{lookback} is a number of cursor units, but the cursor {cursor} is a {type_name}; "
            f"write a duration, e.g. {lookback}s or 5m"
        )
    if numeric and isinstance(lookback, timedelta) and lookback:
        if not given:
            return (
                f"not set, and its default ({_written(lookback)}) is a duration, but the cursor "
                f"{cursor} is a {type_name}: set source.lookback to a whole number of cursor "
                "units, e.g. 1000 (0 turns it off)"
            )
        return (
            f"{_written(lookback)} is a duration, but the cursor {cursor} is a {type_name}, "
            "counted in its own units; write a whole number of them, e.g. 1000 (0 turns it off)"
        )
    return None


def _written(lookback: timedelta | int) -> str:
    """A lookback as the config file writes it: ``5m``, ``1000``."""
    return format_duration(lookback) if isinstance(lookback, timedelta) else str(lookback)


class Source:
    """Reads the configured table; reflects it once on :meth:`open`.

    ``wait(stop, seconds)`` waits before a read is tried again, True if ``stop`` was set
    meanwhile (tests record the delays instead).
    """

    def __init__(
        self,
        engine: Engine,
        spec: SourceSpec,
        *,
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self._wait = wait
        self._table: Table | None = None
        self._pages: dict[tuple[bool, bool, int, bool], Select[Any]] = {}
        # One statement, one implicit read-only transaction: no BEGIN/COMMIT round trips.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        if engine.dialect.name == "postgresql":
            event.listen(engine, "connect", self._configure_session)
        elif engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _lenient_text)

    def _configure_session(self, dbapi_connection: Any, _record: Any) -> None:
        """Every session on the source is read-only and bounded by the statement timeout.

        Set once per connection rather than per transaction: an idle poll is a couple of
        queries, and two extra round trips each would double it.
        """
        millis = int(self.spec.statement_timeout.total_seconds() * 1000)
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cursor.execute(f"SET statement_timeout = {millis}")
        dbapi_connection.commit()

    @property
    def table(self) -> Table:
        if self._table is None:
            self._table = self._reflect()
        return self._table

    @property
    def infinite(self) -> bool:
        """Whether the cursor can hold ``±infinity`` (a PostgreSQL date or timestamp)."""
        cursor = self.table.c[self.spec.cursor]
        postgres = self.engine.dialect.name == "postgresql"
        return postgres and isinstance(cursor.type, DateTime | Date)

    def _finite_cursor(self) -> ColumnElement[Any] | None:
        """The cursor, or NULL where it is infinite (None: the column itself will do)."""
        if not self.infinite:
            return None
        cursor = self.table.c[self.spec.cursor]
        return case((func.isfinite(cursor), cursor), else_=null())

    def open(self) -> Source:
        """Reflect the table; :class:`SourceError` unless every configured column exists."""
        _ = self.table
        return self

    def _reflect(self) -> Table:
        spec = self.spec
        try:
            # Columns only: reflecting the whole table (keys, indexes, constraints, comments)
            # is several catalog queries more, on every start.
            columns = inspect(self.engine).get_columns(spec.table, schema=spec.schema)
            table = Table(
                spec.table,
                MetaData(),
                *(Column(c["name"], c["type"], nullable=c["nullable"]) for c in columns),
                schema=spec.schema,
            )
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
        if spec.gap_free and not isinstance(table.c[spec.cursor].type, Xid8):
            raise SourceError(
                f"cursor_mode xid8 needs an xid8 cursor column, but {spec.cursor} is "
                f"{table.c[spec.cursor].type}",
                "add the column, trigger and index shown in the README (gap-free cursor mode), "
                "or use cursor_mode: timestamp",
            )
        return table

    def fit_lookback(self, lookback: timedelta | int, *, given: bool) -> timedelta | int:
        """``lookback`` in the form the cursor's type needs (a bare ``0`` on a timestamp cursor
        is a zero duration); ``ValueError`` with :func:`lookback_problem`'s message otherwise."""
        cursor = self.table.c[self.spec.cursor]
        kind = None if self.spec.gap_free else _python_type(cursor)
        type_name = self.cursor_type_name()
        problem = lookback_problem(lookback, self.spec.cursor, kind, type_name, given=given)
        if problem is not None:
            raise ValueError(problem)
        if kind in (datetime, date) and isinstance(lookback, int):
            return timedelta(0)
        if kind in (int, Decimal, float) and isinstance(lookback, timedelta):
            return 0
        return lookback

    def cursor_type_name(self) -> str:
        """The cursor column's type as the database names it (``timestamp with time zone``)."""
        kind = self.table.c[self.spec.cursor].type
        if self.engine.dialect.name == "postgresql" and isinstance(kind, DateTime):
            return "timestamp with time zone" if kind.timezone else "timestamp without time zone"
        return str(kind.compile(dialect=self.engine.dialect)).lower()

    def horizon(self) -> Horizon:
        """The source's clock (as a cursor ceiling) and replica lag, in one short query."""
        if self.engine.dialect.name != "postgresql":
            return Horizon()
        [row] = self._run(select(*self._horizon_columns()))
        return Horizon(*row)

    def _horizon_columns(self) -> tuple[ColumnElement[Any], ...]:
        """The ceiling (NULL unless the cursor is a timestamp or date), the replica lag, and
        what the read can see (NULL unless the cursor is a timestamptz): see :class:`Horizon`."""
        cursor = self.table.c[self.spec.cursor]
        temporal = _python_type(cursor) in (datetime, date) and not self.spec.gap_free
        ceiling = cast(func.now(), cursor.type) if temporal else null()
        lag: ColumnElement[Any] = literal_column(
            "CASE WHEN NOT pg_is_in_recovery() THEN NULL"
            " WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0.0"
            " ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END"
        )
        zoned = isinstance(cursor.type, DateTime) and cursor.type.timezone
        seen = _SEEN if zoned and not self.spec.gap_free else null()
        return ceiling.label("ceiling"), lag.label("replica_lag"), seen.label("seen")

    def longest_write_transaction(self) -> float | None:
        """Seconds the oldest write transaction running now has been open, on a primary.

        A standby cannot see the primary's transactions, so there (and on SQLite) it is None.
        """
        if self.engine.dialect.name != "postgresql":
            return None
        query = text(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE coalesce(extract(epoch FROM "
            "max(now() - xact_start)), 0)::float8 END FROM pg_stat_activity "
            "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()"
        )
        [row] = self._run(query)
        return None if row[0] is None else float(row[0])

    def read_page(
        self, after: Position | None, start: Any, limit: int, *, stop: threading.Event | None = None
    ) -> list[SourceRow]:
        """A page after ``after``, or from cursor ``start``, or from the top (see page_query)."""
        query = self._page(after is not None, start is not None, limit, with_horizon=False)
        return self._read(query, page_params(after, start), stop)

    def count_from(
        self, after: Position | None, start: Any, cap: int, *, stop: threading.Event | None = None
    ) -> int:
        """How many rows a scan from here would read, counting at most ``cap``.

        The page condition without the order or the columns: on PostgreSQL an index-only range
        scan of the (cursor, key) index, stopped at ``cap``. Asked once per cycle, and only
        when the first page is full, so an idle poll never counts.
        """
        page = page_query(
            self.table,
            self.spec,
            after=after is not None,
            start=start is not None,
            limit=cap,
            infinite=self.infinite,
        )
        one: ColumnElement[Any] = literal_column("1")
        rows = page.with_only_columns(one, maintain_column_froms=True).order_by(None).subquery()
        [row] = self._run(select(func.count()).select_from(rows), page_params(after, start), stop)
        return int(row[0])

    def first_page(
        self, after: Position | None, start: Any, limit: int, *, stop: threading.Event | None = None
    ) -> tuple[Horizon, list[SourceRow]]:
        """A cycle's first page and the :class:`Horizon`, in one statement.

        The page is joined to the horizon (``horizon LEFT JOIN LATERAL page``), so the horizon
        comes back even when the page is empty: an idle poll is one round trip to the source.
        """
        if self.engine.dialect.name != "postgresql":
            return Horizon(), self.read_page(after, start, limit, stop=stop)
        query = self._page(after is not None, start is not None, limit, with_horizon=True)
        rows = self._run(query, page_params(after, start), stop)
        horizon = Horizon(*rows[0][:3])
        found = [row[4:] for row in rows if row[3] is not None]
        return horizon, self._rows(found)

    def _page(self, after: bool, start: bool, limit: int, *, with_horizon: bool) -> Select[Any]:
        """The page statement of this shape, built once: a reused statement skips SQLAlchemy's
        construction and cache-key work, most of the client-side cost of a small page."""
        shape = (after, start, limit, with_horizon)
        query = self._pages.get(shape)
        if query is None:
            query = page_query(
                self.table, self.spec, after=after, start=start, limit=limit, infinite=self.infinite
            )
            if with_horizon:
                query = _with_horizon(query, self._horizon_columns(), self.spec)
            self._pages[shape] = query
        return query

    def read_keys(
        self, keys: Sequence[Any], *, stop: threading.Event | None = None
    ) -> list[SourceRow]:
        """The current rows of these keys (those that still exist)."""
        if not keys:
            return []
        column = self.table.c[self.spec.key]
        query = read_columns(self.table, self.spec, self._finite_cursor()).where(column.in_(keys))
        return self._read(query.order_by(column), None, stop)

    def read_by_key(
        self,
        after: Any,
        limit: int,
        *,
        outside: bool = False,
        stop: threading.Event | None = None,
    ) -> list[SourceRow]:
        """A page in key order after key ``after`` (None: from the start): the audit's sweep, or
        (``outside``) the sweep of rows outside the keyset scan's reach, whose cursor is NULL or
        infinite (read with a None cursor). An infinite cursor always reads as None."""
        column = self.table.c[self.spec.key]
        query = read_columns(self.table, self.spec, self._finite_cursor())
        if outside:
            query = query.where(out_of_reach(self.table, self.spec, infinite=self.infinite))
        if after is not None:
            query = query.where(column > after)
        return self._read(query.order_by(column).limit(limit), None, stop)

    def outside_reach(self) -> tuple[int, int]:
        """How many rows have a NULL cursor, and how many an infinite one, in one statement.

        Two counts with a condition on the cursor alone, each of which the ``(cursor, key)``
        index answers (it holds NULLs too), rather than one pass over the whole table.
        """
        cursor = self.table.c[self.spec.cursor]
        count = select(func.count()).select_from(self.table)
        nulls = count.where(cursor.is_(None)).scalar_subquery()
        if self.infinite:
            infinite = count.where(cursor.in_(infinities(cursor))).scalar_subquery()
        else:
            infinite = literal_column("0")  # type: ignore[assignment]
        [row] = self._run(select(nulls, infinite))
        return int(row[0]), int(row[1])

    def ahead(self) -> tuple[int, float | None]:
        """Rows stamped ahead of the source's clock, and by how many seconds the furthest is:
        what holds the watermark back (see :func:`cdc_sync.rules.advance`). (0, None) unless
        the cursor is a date or timestamp on PostgreSQL."""
        if not self.infinite or self.spec.gap_free:
            return 0, None
        cursor = self.table.c[self.spec.cursor]
        clock = cast(func.now(), cursor.type)
        top, _ = infinities(cursor)
        gap = cast(func.max(cursor), DateTime()) - cast(clock, DateTime())
        query = select(func.count(), func.extract("epoch", gap)).where(cursor > clock, cursor < top)
        [row] = self._run(query)
        return int(row[0]), None if row[1] is None else float(row[1])

    def position_before(self, cursor: Any) -> Position | None:
        """The (cursor, key) of the last row whose cursor is below ``cursor`` (None: no row is):
        a watermark from which every row at or after ``cursor`` is read again."""
        c, k = self.table.c[self.spec.cursor], self.table.c[self.spec.key]
        query = select(c, k).where(c < cursor).order_by(c.desc(), k.desc()).limit(1)
        rows = self._run(query)
        return Position(rows[0][0], rows[0][1]) if rows else None

    def cursor_from_text(self, text: str) -> Any:
        """An operator's cursor value (``reset-watermark --to``) in the cursor column's type:
        an ISO 8601 time for a timestamp (UTC when it names no zone and the column has one),
        a number for a numeric cursor. ValueError if it is neither."""
        column = self.table.c[self.spec.cursor]
        kind = _python_type(column)
        if kind is datetime:
            value = datetime.fromisoformat(text)
            if getattr(column.type, "timezone", False) and value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value
        if kind is date:
            return date.fromisoformat(text)
        return int(text)

    def key_from_text(self, text: str) -> Any:
        """A key as stored in the status table (text) back in the source column's type."""
        kind = _python_type(self.table.c[self.spec.key])
        if kind is int:
            return int(text)
        if kind is uuid.UUID:
            return uuid.UUID(text)
        return text

    def _run(
        self,
        query: Executable,
        params: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> Sequence[Any]:
        """Run one query (its own short read-only transaction), retrying what a replica throws.

        A recovery conflict or a dropped connection gets a fresh transaction on a fresh
        connection after a short backoff; anything else, or the last failure, is a SourceError.
        ``stop`` cuts the backoff short and ends the read with :class:`Stopped`.
        """
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                with self._autocommit.connect() as connection:
                    return connection.execute(query, params).all()
            except UnicodeEncodeError:  # a key or cursor read back from SQLite, bound again
                raise SourceError(
                    f"reading the source {self._where()} failed: a value of its key or cursor "
                    "column is text that is not valid UTF-8",
                    f"correct that row's {self.spec.key} or {self.spec.cursor} in the source",
                ) from None
            except SQLAlchemyError as exc:
                if attempt == READ_ATTEMPTS or not retryable(exc):
                    raise self._failure(exc) from exc
                delay = 0.2 * 4 ** (attempt - 1)
                log.warning(
                    "source_read_retried",
                    attempt=attempt,
                    delay_s=delay,
                    sqlstate=_sqlstate(exc),
                    error=first_line(exc),
                )
                if self._wait(stop or _UNSTOPPED, delay):
                    raise Stopped("stopped while a source read waited to be tried again") from exc
        raise AssertionError("unreachable")

    def _read(
        self,
        query: Select[Any],
        params: Mapping[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> list[SourceRow]:
        """Run a query over ``spec.columns()`` and build its rows."""
        return self._rows(self._run(query, params, stop))

    def _rows(self, rows: Iterable[Sequence[Any]]) -> list[SourceRow]:
        """Rows of ``spec.columns()`` as SourceRows (by position: a hot loop)."""
        spec = self.spec
        at = {name: index for index, name in enumerate(spec.columns())}
        key, cursor, euid = at[spec.key], at[spec.cursor], at[spec.euid]
        contacts = [(k, at[column]) for k, column in spec.contacts.items()]
        if spec.consent is None and spec.deleted is None:
            return [
                SourceRow(row[key], row[cursor], row[euid], {k: row[i] for k, i in contacts})
                for row in rows
            ]
        consent = None if spec.consent is None else at[spec.consent]
        deleted = None if spec.deleted is None else at[spec.deleted]
        return [
            SourceRow(
                row[key],
                row[cursor],
                row[euid],
                {k: row[i] for k, i in contacts},
                True if consent is None else row[consent],
                None if deleted is None else row[deleted],
            )
            for row in rows
        ]

    # -- what `cdc-sync check` reports ------------------------------------------------------

    def facts(self) -> SourceFacts:
        """Everything ``check`` reports of the source, read now."""
        nulls, infinite = self.outside_reach()
        ahead, ahead_by = self.ahead()
        nullable = bool(self.table.c[self.spec.cursor].nullable)
        return SourceFacts(
            url=self._where(),
            index=self.index_advice(),
            horizon=self.horizon(),
            longest_transaction=self.longest_write_transaction(),
            cursor_type=self.cursor_type_name(),
            nullable=nullable,
            null_rows=nulls,
            infinite_rows=infinite,
            reach_fix=self.reach_fix(nullable, infinite > 0),
            ahead_rows=ahead,
            ahead_by_s=ahead_by,
        )

    def reach_fix(self, nullable: bool, infinite: bool) -> tuple[str, ...]:
        """The statements that give every row a finite cursor and keep it so (a timestamp or
        date cursor on PostgreSQL: stamp the rows now, default to now(), NOT NULL, finite)."""
        if not (nullable or infinite) or not self.infinite or self.spec.gap_free:
            return ()
        quote = self.engine.dialect.identifier_preparer.quote
        table, cursor = self._quoted_table(), quote(self.spec.cursor)
        broken = [f"{cursor} IS NULL"] if nullable else []
        broken += [f"NOT isfinite({cursor})"] if infinite else []
        # Printed for the operator, never run; every name is quoted by SQLAlchemy's preparer.
        statements = [f"UPDATE {table} SET {cursor} = now() WHERE {' OR '.join(broken)};"]  # noqa: S608
        if nullable:
            statements.append(
                f"ALTER TABLE {table} ALTER COLUMN {cursor} SET DEFAULT now(), "
                f"ALTER COLUMN {cursor} SET NOT NULL;"
            )
        if infinite:
            check = quote(f"{self.spec.table}_{self.spec.cursor}_finite")
            statements.append(
                f"ALTER TABLE {table} ADD CONSTRAINT {check} CHECK (isfinite({cursor}));"
            )
        return tuple(statements)

    def index_advice(self) -> IndexAdvice:
        """Whether an index serves the ``(cursor, key)`` poll, and the statements that would
        create one, each quoted as PostgreSQL (or SQLite) requires and safe to paste.

        A view or a foreign table cannot be indexed: the advice says so and shows the plan of a
        page. A partitioned table is indexed per partition (``CONCURRENTLY``: no write lock),
        then on the parent without ``CONCURRENTLY``, which PostgreSQL refuses on a partitioned
        table; with every partition indexed that last step only attaches the existing indexes.
        """
        if self.engine.dialect.name != "postgresql":
            return self._sqlite_index_advice()
        spec, quote = self.spec, self.engine.dialect.identifier_preparer.quote
        with self._autocommit.connect() as connection:
            relkind = connection.scalar(_RELKIND, {"name": self._quoted_table()})
            if relkind in ("v", "f"):
                plan = self._page_plan(connection)
                what = "a view" if relkind == "v" else "a foreign table"
                return IndexAdvice(
                    None,
                    (),
                    f"{spec.qualified_table} is {what}, which PostgreSQL cannot index: every poll "
                    f"runs its query ({plan}); index ({spec.cursor}, {spec.key}) on the table "
                    "behind it, or point source.table at that table",
                )
            params = {"name": self._quoted_table(), "cursor": spec.cursor, "key": spec.key}
            tree = connection.execute(_INDEX_TREE, params).all()
        columns = f"({quote(spec.cursor)}, {quote(spec.key)})"
        root = tree[0]
        if root.found is not None:
            return IndexAdvice(root.found, (), None)
        name = f"{spec.table}_{spec.cursor}_{spec.key}_idx"
        if relkind != "p":
            statement = f"CREATE INDEX CONCURRENTLY {quote(name)} ON {self._quoted_table()} "
            return IndexAdvice(None, (statement + columns + ";",), None)
        leaves = [row for row in tree if row.isleaf]
        if leaves and all(row.found is not None for row in leaves):
            return IndexAdvice(f"one on each of its {len(leaves)} partitions", (), None)
        statements = [
            f"CREATE INDEX CONCURRENTLY {quote(f'{row.relname}_{spec.cursor}_{spec.key}_idx')} "
            f"ON {quote(row.nspname)}.{quote(row.relname)} {columns};"
            for row in leaves
            if row.found is None
        ]
        statements.append(f"CREATE INDEX {quote(name)} ON {self._quoted_table()} {columns};")
        return IndexAdvice(
            None,
            tuple(statements),
            f"{spec.qualified_table} is partitioned, and PostgreSQL cannot build an index on a "
            "partitioned table CONCURRENTLY: index each partition concurrently first; the "
            "parent's index then only attaches them",
        )

    def _sqlite_index_advice(self) -> IndexAdvice:
        spec, quote = self.spec, self.engine.dialect.identifier_preparer.quote
        inspector = inspect(self.engine)
        if spec.table in inspector.get_view_names(schema=spec.schema):
            return IndexAdvice(
                None, (), f"{spec.qualified_table} is a view, which cannot be indexed"
            )
        wanted = [spec.cursor, spec.key]
        for index in inspector.get_indexes(spec.table, schema=spec.schema):
            if list(index["column_names"][:2]) == wanted:
                return IndexAdvice(index["name"], (), None)
        name = quote(f"{spec.table}_{spec.cursor}_{spec.key}_idx")
        if spec.schema:  # SQLite names the index's schema, not the table's
            name = f"{self.engine.dialect.identifier_preparer.quote_schema(spec.schema)}.{name}"
        statement = (
            f"CREATE INDEX {name} ON {quote(spec.table)} ({quote(spec.cursor)}, {quote(spec.key)});"
        )
        return IndexAdvice(None, (statement,), None)

    def _quoted_table(self) -> str:
        """The configured table's name, schema-qualified and quoted by SQLAlchemy's preparer."""
        preparer = self.engine.dialect.identifier_preparer
        name = preparer.quote(self.spec.table)
        return f"{preparer.quote_schema(self.spec.schema)}.{name}" if self.spec.schema else name

    def _page_plan(self, connection: Connection) -> str:
        """The planner's top node and estimated cost for a first page (what a poll costs)."""
        query = page_query(self.table, self.spec, after=False, start=False, limit=500)
        compiled = query.compile(dialect=self.engine.dialect)
        explain = f"EXPLAIN (FORMAT JSON) {compiled}"
        [[plan]] = connection.exec_driver_sql(explain, compiled.params).all()
        top = plan[0]["Plan"]
        scans = sorted(set(_scans(top)))
        return (
            f"a page of 500 rows is planned as {top['Node Type']} over {', '.join(scans)}, "
            f"estimated cost {top['Total Cost']:.0f}"
        )

    def _failure(self, exc: SQLAlchemyError) -> SourceError:
        return SourceError(
            f"reading the source {self._where()} failed: {first_line(exc)}",
            "check source.url, that the server is up, and that the user may read the table",
        )

    def _where(self) -> str:
        return mask_password(self.engine.url)


def _with_horizon(
    page: Select[Any], horizon: tuple[ColumnElement[Any], ...], spec: SourceSpec
) -> Select[Any]:
    """``SELECT ceiling, replica_lag, seen, found, <page columns> FROM (SELECT <horizon>) LEFT JOIN
    LATERAL (<page>) ON true ORDER BY cursor, key``: one row of NULLs after the horizon when the
    page is empty, told apart by ``found``. The outer ORDER BY is what guarantees the order (a
    join promises none); on a page already in order it is a cheap sort of at most a page."""
    clock = select(*horizon).subquery("horizon")
    rows = page.add_columns(literal_column("true").label("cdc_sync_found")).lateral("page")
    names = spec.columns()
    return (
        select(*clock.c, rows.c.cdc_sync_found, *(rows.c[name] for name in names))
        .select_from(clock.outerjoin(rows, true()))
        .order_by(rows.c[spec.cursor], rows.c[spec.key])
    )


# SQLite keeps whatever bytes were written as TEXT; Python's sqlite3 decodes each value as UTF-8
# and fails the whole query on one bad value, quoting it. Decoded this way, a bad byte becomes an
# unpaired surrogate instead: mapping refuses that one row, naming the column, never the value.
_decode_text = functools.partial(str, encoding="utf-8", errors="surrogateescape")


def _lenient_text(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.text_factory = _decode_text


# What a read on this server can see (Horizon.seen). A standby that has replayed everything its
# primary last reported (latest_end_lsn, sent at last_msg_send_time) has seen up to that report;
# pg_stat_wal_receiver shows those only to pg_read_all_stats, and NULL is ignored by greatest().
_SEEN = literal_column(
    "CASE WHEN NOT pg_is_in_recovery() THEN now() ELSE greatest("
    "pg_last_xact_replay_timestamp(), (SELECT last_msg_send_time FROM pg_stat_wal_receiver"
    " WHERE latest_end_lsn <= pg_last_wal_replay_lsn())) END",
    type_=DateTime(timezone=True),
)

# The kind of relation the configured name is: r table, p partitioned, v view, m materialized
# view, f foreign table. The name is passed quoted, as to_regclass parses it.
_RELKIND = text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:name)")

# The relation and its partitions, root first, each with a valid index leading on
# (cursor, key) if it has one. A plain table or materialized view is a tree of one.
_INDEX_TREE = text(
    """
SELECT n.nspname, c.relname, coalesce(t.isleaf, true) AS isleaf,
       (SELECT ic.relname FROM pg_index i
          JOIN pg_class ic ON ic.oid = i.indexrelid
          JOIN pg_attribute a0 ON a0.attrelid = i.indrelid AND a0.attnum = i.indkey[0]
          JOIN pg_attribute a1 ON a1.attrelid = i.indrelid AND a1.attnum = i.indkey[1]
         WHERE i.indrelid = c.oid AND i.indisvalid AND i.indpred IS NULL
           AND a0.attname = :cursor AND a1.attname = :key
         ORDER BY ic.relname LIMIT 1) AS found
FROM (SELECT to_regclass(:name) AS oid) root
LEFT JOIN LATERAL pg_partition_tree(root.oid) t ON true
JOIN pg_class c ON c.oid = coalesce(t.relid, root.oid)
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY coalesce(t.level, 0), n.nspname, c.relname
"""
)


def _scans(plan: Mapping[str, Any]) -> Iterable[str]:
    """``Seq Scan on users``, ``Index Scan on users``... for every scan in a JSON plan."""
    if "Relation Name" in plan:
        yield f"{plan['Node Type']} on {plan['Relation Name']}"
    for child in plan.get("Plans", ()):
        yield from _scans(child)


def _python_type(column: Column[Any]) -> type | None:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


def retryable(exc: SQLAlchemyError) -> bool:
    """Whether a failed read deserves a fresh transaction (see RETRYABLE_STATES)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    state = _sqlstate(exc)
    return state in RETRYABLE_STATES or (state or "").startswith("08")


def _sqlstate(exc: SQLAlchemyError) -> str | None:
    return getattr(getattr(exc, "orig", None), "sqlstate", None)
