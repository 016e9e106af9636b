"""The state store: the only code that reads and writes the tracking tables.

Every page is committed in one transaction: the outcomes of its rows (one upsert statement) and
the watermark that moves over them. A crash between pages therefore loses nothing: either the page's
outcomes and its watermark are both durable, or neither is and the page is read again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    Select,
    String,
    Text,
    any_,
    bindparam,
    case,
    cast,
    column,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY, JSON
from sqlalchemy.exc import SQLAlchemyError

from cdc_sync.dburls import mask_password
from cdc_sync.errors import StateError, first_line
from cdc_sync.models import (
    VERSION_TABLE,
    UtcDateTime,
    sync_history,
    sync_identities,
    sync_runs,
    sync_state,
    sync_status,
)
from cdc_sync.outcomes import (
    AuditSlice,
    CycleCounts,
    CycleReport,
    CycleStart,
    PageReport,
    RunOutcome,
    describe,
)
from cdc_sync.redact import clean, storable
from cdc_sync.rules import Position, Record, Status, Update

if TYPE_CHECKING:
    from alembic.config import Config

# Every migration in migrations/versions, oldest first (a test holds them to alembic's own view).
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007")
SCHEMA_HEAD = REVISIONS[-1]

SHARED_VERSION_TABLE = "alembic_version"
"""Alembic's default version table, where cdc-sync kept its revision before :data:`VERSION_TABLE`;
other alembic applications keep theirs there too."""

log = structlog.get_logger("cdc_sync.state")

REMEMBERED_RECORDS = 10_000  # status rows StateStore.records keeps in memory, at most

ERROR_LIMIT = 2000  # characters of a cycle's error kept in cdc_sync_runs.error

SAVE_PROGRESS_EVERY = 1.0  # seconds between saves of a running cycle's counts to its run row

ANALYZE_AFTER = 1000  # status rows this process writes before it checks the table's statistics

HISTORY_PER_USER = 20  # outcomes kept per user in cdc_sync_history when it is pruned


def migrations_dir() -> Path:
    """Where the alembic scripts are: inside the installed package, or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StateError(
        "the migration scripts are missing from this installation", "reinstall cdc-sync"
    )


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config  # alembic is imported by the commands that migrate

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


# Watermark values keep their type through the database: "int:42", "datetime:2026-01-01T00:00:00".
_DECODERS: dict[str, Any] = {
    "int": int,
    "str": str,
    "text": lambda raw: bytes.fromhex(raw).decode("utf-8", "surrogatepass"),
    "decimal": Decimal,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "uuid": uuid.UUID,
}


def encode_value(value: Any) -> str:
    """A type-tagged text form of a cursor or key value, decoded exactly by :func:`decode_value`."""
    if isinstance(value, bool):
        raise TypeError("a boolean cannot be a cursor or key")
    if isinstance(value, str) and not value.isprintable() and not storable(value):
        # A NUL (PostgreSQL text cannot hold it) or an unpaired surrogate: stored as hex.
        return f"text:{value.encode('utf-8', 'surrogatepass').hex()}"
    for tag, kind in (
        ("int", int),
        ("str", str),
        ("decimal", Decimal),
        ("datetime", datetime),
        ("date", date),
        ("uuid", uuid.UUID),
    ):
        if isinstance(value, kind):
            text = value.isoformat() if isinstance(value, date) else str(value)
            return f"{tag}:{text}"
    raise TypeError(f"cannot store a {type(value).__name__} as a watermark")


def decode_value(text: str) -> Any:
    tag, _, raw = text.partition(":")
    return _DECODERS[tag](raw)


def _decoded(text: str | None) -> Any:
    return None if text is None else decode_value(text)


@dataclass(frozen=True, slots=True)
class Progress:
    """This sync's row of ``cdc_sync_state``: where each of its readers stands.

    ``horizon``: what the read behind the watermark could see (``Horizon.seen``), the anchor of
    the next re-read window. ``reach_*``: the sweep of rows outside the cursor's reach (NULL or
    infinite cursor): where it resumes, how many there were and when it last finished.
    ``held_*``: rows stamped ahead of the source's clock that held the watermark last cycle.
    """

    watermark: Position | None = None
    horizon: Any = None
    reach_key: Any = None
    reach_rows: int | None = None
    reach_checked_at: datetime | None = None
    held_rows: int | None = None
    held_by_s: float | None = None


@dataclass(frozen=True, slots=True)
class RunRow:
    """One cycle in the run history (``cdc_sync_runs``)."""

    id: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    counts: CycleCounts
    rows_estimated: int | None  # rows its scan expected to read, when it met a backlog
    replica_lag_s: float | None
    watermark_before: str | None
    watermark_after: str | None
    error: str | None

    @classmethod
    def of(cls, row: Any) -> RunRow:
        m = row._mapping
        counts = CycleCounts.of(m)
        return cls(
            m["id"],
            m["started_at"],
            m["finished_at"],
            m["outcome"],
            counts,
            m["rows_estimated"],
            m["replica_lag_s"],
            m["watermark_before"],
            m["watermark_after"],
            m["error"],
        )


@dataclass(frozen=True, slots=True)
class UserStatus:
    """One user's row in ``cdc_sync_status``: what reached EngageLab, when, and why not."""

    source_key: str
    euid: int | None
    status: Status
    pushed_hash: str | None
    attempted_hash: str | None
    attempts: int
    last_code: int | None
    last_message: str | None
    first_seen_at: datetime
    last_attempt_at: datetime | None
    last_success_at: datetime | None
    next_attempt_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> UserStatus:
        m = dict(row._mapping)
        del m["sync_name"]
        m["status"] = Status(m["status"])
        return cls(**m)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One recorded outcome of one user (``cdc_sync_history``); no contact values."""

    at: datetime
    status: Status
    attempts: int
    code: int | None
    message: str | None
    attempted_hash: str | None


@dataclass(frozen=True, slots=True)
class Pruned:
    """What :meth:`StateStore.prune` deleted."""

    runs: int
    history: int


@dataclass(frozen=True, slots=True)
class StatusView:
    """What ``cdc-sync status`` shows: read in one go, formatted by :mod:`cdc_sync.report`."""

    name: str
    progress: Progress  # the watermark and where each reader stands
    counts: dict[str, int]  # users by status
    runs: list[RunRow]  # newest first
    problems: list[UserStatus]  # failed, then retrying, then skipped; newest first
    reset: tuple[Position | None] | None = None  # a watermark reset the next cycle applies


class StateStore:
    """The tracking tables of one sync (``sync_name``) in the state database."""

    def __init__(self, engine: Engine, sync_name: str) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.sync_name = sync_name
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise StateError(f"the tracking database must be SQLite or PostgreSQL, not {dialect}")
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._records_query = _records_query(dialect)
        self._identities_query = _identities_query(dialect)
        self._store_identities = self._insert(sync_identities).on_conflict_do_nothing()
        # Status rows are written with one statement per page on PostgreSQL (the upsert and the
        # history append, from one parse of the page), two executemany on SQLite.
        self._writes = self._write_statements(dialect)
        # The operator epoch read with the last run start, and whether a reset waits then.
        self.epoch = 0
        self.reset_pending = False
        # Status rows read lately (None: no row), by key, least recently used first.
        self._known: OrderedDict[str, Record | None] = OrderedDict()
        # EUIDs of identity values, by (identity name, value): a resolved value keeps its EUID
        # for good, so what is remembered is never stale. Least recently used first.
        self._euids: OrderedDict[tuple[str, str], int] = OrderedDict()
        # Status rows written before the table's statistics are checked (None: checked).
        self._unchecked: int | None = 0 if dialect == "postgresql" else None

    # -- schema ---------------------------------------------------------------------------

    def migrate(self, revision: str = "head") -> None:
        from alembic import command
        from alembic.util import CommandError

        try:
            with self._transaction() as connection:
                moved = _take_back_shared_revision(connection)
                if moved is not None:
                    command.stamp(alembic_config(connection), moved)
                command.upgrade(alembic_config(connection), revision)
        except CommandError as exc:  # e.g. a revision of a newer cdc-sync's, unknown here
            raise StateError(
                f"the tracking database {self._where()} cannot be migrated: {exc}",
                f"its {VERSION_TABLE} names a revision this cdc-sync does not ship "
                f"(it knows {', '.join(REVISIONS)}): run the cdc-sync release that migrated it",
            ) from None

    def downgrade(self, revision: str) -> None:
        from alembic import command

        with self._transaction() as connection:
            command.downgrade(alembic_config(connection), revision)

    def schema_revision(self) -> tuple[str | None, str | None]:
        """(current revision of the database, latest revision shipped)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with self._connect() as connection:
            opts = {"version_table": VERSION_TABLE}
            current = MigrationContext.configure(connection, opts=opts).get_current_revision()
            if current is None and (shared := _shared_revision(connection)) is not None:
                current = f"{shared} in {SHARED_VERSION_TABLE}"  # not head: migrate moves it
        return current, head

    def require_schema(self) -> None:
        """Raise :class:`StateError` unless the tracking tables are at the latest migration.

        Read with plain SQL against :data:`SCHEMA_HEAD`: loading alembic and its scripts costs a
        fifth of a second of CPU, on every start of every ``once``.
        """
        with self._connect() as connection:
            ours = inspect(connection).has_table(VERSION_TABLE)
            current = connection.scalar(_VERSION) if ours else None
            shared = _shared_revision(connection) if current is None else None
        if current != SCHEMA_HEAD:
            if shared is not None:
                state = f"keeps its revision ({shared}) in {SHARED_VERSION_TABLE}, as cdc-sync did"
            elif current is None:
                state = "has no tracking tables"
            else:
                state = f"is at revision {current}"
            raise StateError(
                f"the tracking database {self._where()} {state}, "
                f"but this cdc-sync needs {SCHEMA_HEAD}",
                "run `cdc-sync migrate`",
            )

    # -- reads ----------------------------------------------------------------------------

    def watermark(self) -> Position | None:
        return self.progress().watermark

    def progress(self) -> Progress:
        """This sync's row of ``cdc_sync_state``, in one query."""
        with self._connect() as connection:
            row = connection.execute(_PROGRESS, {"sync": self.sync_name}).first()
        if row is None:
            return Progress()
        watermark = None
        if row.cursor_value is not None:
            watermark = Position(decode_value(row.cursor_value), decode_value(row.key_value))
        return Progress(
            watermark=watermark,
            horizon=_decoded(row.horizon_value),
            reach_key=_decoded(row.reach_key),
            reach_rows=row.reach_rows,
            reach_checked_at=row.reach_checked_at,
            held_rows=row.held_rows,
            held_by_s=row.held_by_s,
        )

    def records(self, keys: Sequence[str]) -> dict[str, Record]:
        """The status rows of ``keys``: those read lately from memory, the rest in one query.

        An idle cycle re-reads the users in its lookback window, whose rows have not changed
        since the last cycle read them, so those come from memory. What is remembered was read
        from the database and is dropped when this store writes that user; :meth:`forget` drops
        everything, for when another process may have written (a new tenure of the lock).
        """
        found: dict[str, Record] = {}
        missing = []
        for key in keys:
            if key in self._known:
                self._known.move_to_end(key)
                record = self._known[key]
                if record is not None:
                    found[key] = record
            else:
                missing.append(key)
        if not missing:
            return found
        params = {"sync": self.sync_name, "keys": missing}
        with self._connect() as connection:
            read = {
                key: Record(Status(status), pushed, attempted, attempts, next_at)
                for key, status, pushed, attempted, attempts, next_at in connection.execute(
                    self._records_query, params
                )
            }
        for key in missing:
            self._known[key] = read.get(key)
        while len(self._known) > REMEMBERED_RECORDS:
            self._known.popitem(last=False)
        return found | read

    def identities(self, name: str, values: Sequence[str]) -> dict[str, int]:
        """The EUIDs stored for identity values of kind ``name``: those read or stored lately
        from memory, the rest in one query. A value without one is left out."""
        found: dict[str, int] = {}
        missing = []
        for value in values:
            euid = self._euids.get((name, value))
            if euid is None:
                missing.append(value)
            else:
                self._euids.move_to_end((name, value))
                found[value] = euid
        if not missing:
            return found
        params = {"sync": self.sync_name, "name": name, "values": missing}
        with self._connect() as connection:
            rows = connection.execute(self._identities_query, params)
            read: dict[str, int] = {value: euid for value, euid in rows}
        self._remember_euids(name, read)
        return found | read

    def store_identities(self, name: str, euids: Mapping[str, int], now: datetime) -> None:
        """Store the EUIDs ``register`` gave for identity values, in one transaction, before
        anything is pushed to them: a crash after this never resolves them again."""
        if not euids:
            return
        rows = [
            {
                "sync_name": self.sync_name,
                "identity_name": name,
                "identity_value": value,
                "euid": euid,
                "resolved_at": now,
            }
            for value, euid in euids.items()
        ]
        with self._transaction() as connection:
            connection.execute(self._store_identities, rows)
        self._remember_euids(name, euids)

    def _remember_euids(self, name: str, euids: Mapping[str, int]) -> None:
        for value, euid in euids.items():
            self._euids[(name, value)] = euid
        while len(self._euids) > REMEMBERED_RECORDS:
            self._euids.popitem(last=False)

    def forget(self) -> None:
        """Drop the status rows remembered by :meth:`records`: read them again when next asked."""
        self._known.clear()

    def earliest_retry(self) -> datetime | None:
        """When the next retrying user falls due (None: nobody is retrying)."""
        c = sync_status.c
        query = select(func.min(c.next_attempt_at)).where(
            c.sync_name == self.sync_name, c.status == Status.RETRYING.value
        )
        with self._connect() as connection:
            earliest: datetime | None = connection.scalar(query)  # min() keeps the UTC type
        return earliest

    def due_retries(
        self, now: datetime, limit: int, *, before: datetime | None = None
    ) -> list[str]:
        """Keys of users whose transient failure is due for another attempt, oldest first;
        with ``before``, only those not attempted since (not yet in this cycle). A user the
        audit re-queued (an empty attempted hash) has not been sent since, whatever the times."""
        c = sync_status.c
        attempted = (
            true()
            if before is None
            else or_(
                c.last_attempt_at.is_(None), c.last_attempt_at < before, c.attempted_hash == ""
            )
        )
        query = (
            select(c.source_key)
            .where(
                c.sync_name == self.sync_name,
                c.status == Status.RETRYING.value,
                c.next_attempt_at <= now,
                attempted,
            )
            .order_by(c.next_attempt_at, c.source_key)
            .limit(limit)
        )
        with self._connect() as connection:
            return list(connection.scalars(query))

    def euids(self, keys: Sequence[str]) -> dict[str, int | None]:
        """The euid last recorded for each of ``keys`` that has a status row."""
        c = sync_status.c
        query = select(c.source_key, c.euid).where(
            c.sync_name == self.sync_name, c.source_key.in_(keys)
        )
        with self._connect() as connection:
            return {key: euid for key, euid in connection.execute(query)}

    def tracked_keys(self, after: str | None, limit: int) -> list[str]:
        """Keys of users still in the sync (not ``left``) after ``after``, in key order: the
        audit checks each slice against the source to find hard deletes."""
        c = sync_status.c
        query = select(c.source_key).where(
            c.sync_name == self.sync_name, c.status != Status.LEFT.value
        )
        if after is not None:
            query = query.where(c.source_key > after)
        with self._connect() as connection:
            return list(connection.scalars(query.order_by(c.source_key).limit(limit)))

    # -- writes ---------------------------------------------------------------------------

    def commit_page(
        self,
        updates: Sequence[Update],
        watermark: Position | None,
        now: datetime,
        horizon: Any = None,
    ) -> None:
        """Record a page's outcomes and move the watermark, in one transaction.

        ``watermark`` None leaves it where it is; with nothing to write, nothing is sent.
        ``horizon`` is what the read behind the watermark could see (``Horizon.seen``), stored
        with it (None: the horizon is cleared, and the next start uses the plain lookback).
        """
        if not updates and watermark is None:
            return
        with self._transaction() as connection:
            self._upsert_status(connection, [self._row(u, now) for u in updates])
            if watermark is not None:
                self._store_watermark(connection, watermark, now, horizon)
        if self._unchecked is not None and updates:
            self._analyze_if_new(len(updates))

    def _analyze_if_new(self, written: int) -> None:
        """Analyse the status table once a page has landed, if PostgreSQL knows nothing of it.

        psycopg prepares a statement on its fifth use, and PostgreSQL may then settle on one
        generic plan for the connection's life. For a page's lookup (``source_key = ANY(keys)``)
        on a table without statistics that plan is a sequential scan comparing every row with
        every key: measured at 10,000 rows, 215 ms instead of 5, and growing with the table
        until autovacuum first analyses it, a minute or more into a first backfill. With
        statistics it is a primary key probe. Checked once per process; autovacuum keeps them.
        """
        self._unchecked = (self._unchecked or 0) + written
        if self._unchecked < ANALYZE_AFTER:
            return
        self._unchecked = None
        name = self.engine.dialect.identifier_preparer.format_table(sync_status)
        try:
            with self._connect() as connection:
                known = connection.scalar(  # -1: never analysed; a few: analysed nearly empty
                    text("SELECT reltuples FROM pg_class WHERE oid = CAST(:name AS regclass)"),
                    {"name": name},
                )
                if known is not None and known < ANALYZE_AFTER:
                    # A role that does not own the table gets a warning, not an error.
                    connection.execute(text(f"ANALYZE {name}"))
        except StateError as exc:  # the page is recorded; only the lookups' speed is at stake
            log.warning("status_table_not_analysed", error=str(exc))

    def _upsert_status(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update status rows and append each to the users' history: on PostgreSQL
        one statement with one parameter for the page.

        PostgreSQL gets the page as one JSON document unpacked server-side (json_to_recordset):
        executemany sends a statement per row, a multi-row VALUES list costs more to build and
        parse than it saves, and psycopg dumps array parameters in Python, a regex per element.
        json.dumps and PostgreSQL's JSON parser are both C. SQLite runs in process, where
        executemany is a tight C loop.
        """
        if not rows:
            return
        for row in rows:
            self._known.pop(row["source_key"], None)
        params: Any = rows
        if self.engine.dialect.name == "postgresql":
            params = {"rows": json.dumps(_json_rows(rows), separators=(",", ":"))}
        for statement in self._writes:
            connection.execute(statement, params)

    def _write_statements(self, dialect: str) -> list[Any]:
        """What writes a page's status rows (see :meth:`_upsert_status`), built once per store.

        On PostgreSQL the upsert is a data-modifying CTE of the history insert, both reading the
        page from one ``json_to_recordset``: parsing the page was most of the cost, and measured
        on 1000-row pages this writes a page in 24 to 28 ms against 52 to 74 ms for two statements
        on ``jsonb_to_recordset``, each parsing it again.
        """
        if dialect != "postgresql":
            return [self._upsert_statement(None), _sqlite_history()]
        rows = _recordset().cte("r")
        upsert = self._upsert_statement(select(rows))
        history = insert(sync_history).from_select(
            list(_HISTORY_FROM), select(*(rows.c[name] for name in _HISTORY_FROM.values()))
        )
        return [history.add_cte(upsert.cte("up"))]

    def _upsert_statement(self, source: Select[Any] | None) -> Any:
        """The status upsert, from ``source`` rows (PostgreSQL) or executemany (SQLite); built
        once per store, as the page statements are: rebuilding it cost 1.1 ms a page."""
        insert_ = self._insert(sync_status)
        stmt = (
            insert_
            if source is None
            else insert_.from_select(source.selected_columns.keys(), source)
        )
        new, old = stmt.excluded, sync_status.c
        keep_if_null = ("euid", "pushed_hash", "last_attempt_at", "last_success_at")
        changes: dict[str, Any] = {n: func.coalesce(new[n], old[n]) for n in keep_if_null}
        for name in (
            "status",
            "attempted_hash",
            "attempts",
            "last_code",
            "last_message",
            "next_attempt_at",
            "updated_at",
        ):
            changes[name] = new[name]
        return stmt.on_conflict_do_update(
            index_elements=[old.sync_name, old.source_key], set_=changes
        )

    def _row(self, u: Update, now: datetime) -> dict[str, Any]:
        return {
            "sync_name": self.sync_name,
            "source_key": u.key,
            "euid": u.euid,
            "status": u.status.value,
            "pushed_hash": u.pushed_hash,
            "attempted_hash": u.attempted_hash,
            "attempts": u.attempts,
            "last_code": u.last_code,
            "last_message": u.last_message,
            "first_seen_at": now,
            "last_attempt_at": u.attempted_at,
            "last_success_at": u.succeeded_at,
            "next_attempt_at": u.next_attempt_at,
            "updated_at": now,
        }

    def _store_watermark(
        self, connection: Connection, position: Position, now: datetime, horizon: Any
    ) -> None:
        cursor, key = encode_value(position.cursor), encode_value(position.key)
        seen = None if horizon is None else encode_value(horizon)
        self._store_state(connection, now, cursor_value=cursor, key_value=key, horizon_value=seen)

    def _store_state(self, connection: Connection, now: datetime, **values: Any) -> None:
        """Set these columns of this sync's row in ``cdc_sync_state``, creating it if need be."""
        values["updated_at"] = now
        stmt = self._insert(sync_state).values(sync_name=self.sync_name, **values)
        connection.execute(
            stmt.on_conflict_do_update(index_elements=[sync_state.c.sync_name], set_=values)
        )

    def start_run(self, now: datetime, watermark: Position | None) -> int:
        """Open a run row; its id. The same statement reads the operator epoch into
        :attr:`epoch` and whether a watermark reset waits into :attr:`reset_pending`, so a
        running daemon notices an operator's command at no extra cost."""
        row = {
            "sync_name": self.sync_name,
            "sync": self.sync_name,
            "started_at": now,
            "outcome": RunOutcome.RUNNING.value,
            "watermark_before": describe(watermark),
        }
        with self._connect() as connection:  # one statement: atomic by itself
            run_id, epoch, reset_at = connection.execute(_START_RUN, row).one()
        self.epoch = epoch or 0
        self.reset_pending = reset_at is not None
        return int(run_id)

    def apply_reset(self, run_id: int, now: datetime) -> bool:
        """Apply a watermark reset an operator requested, if one waits; whether one did.

        Called under the instance lock at the start of a cycle. The request is cleared only if
        it is the one read, so a newer one is never lost (its epoch brings it next cycle).
        """
        s = sync_state.c
        with self._transaction() as connection:
            row = connection.execute(_RESET, {"sync": self.sync_name}).first()
            if row is None or row.reset_requested_at is None:
                return False
            applied = connection.execute(
                update(sync_state)
                .where(
                    s.sync_name == self.sync_name,
                    s.reset_requested_at == row.reset_requested_at,
                )
                .values(
                    cursor_value=row.reset_cursor,
                    key_value=row.reset_key,
                    horizon_value=None,  # the re-read window starts from the new watermark
                    reset_requested_at=None,
                    reset_cursor=None,
                    reset_key=None,
                    updated_at=now,
                )
            ).rowcount
            if applied:
                position = _position(row.reset_cursor, row.reset_key)
                connection.execute(
                    update(sync_runs)
                    .where(sync_runs.c.id == run_id)
                    .values(watermark_before=describe(position))
                )
        if applied:
            log.warning("watermark_reset", sync=self.sync_name, to=describe(position))
        return bool(applied)

    def finish_run(
        self,
        run_id: int,
        now: datetime,
        outcome: RunOutcome,
        counts: CycleCounts,
        watermark: Position | None,
        error: str | None = None,
        replica_lag: float | None = None,
        rows_estimated: int | None = None,
    ) -> None:
        values = {
            "run": run_id,
            "finished_at": now,
            "outcome": outcome.value,
            "watermark_after": describe(watermark),
            "error": None if error is None else clean(error, ERROR_LIMIT),
            "replica_lag_s": replica_lag,
            "rows_estimated": rows_estimated,
            **counts.as_dict(),
        }
        with self._connect() as connection:  # one statement: atomic by itself
            connection.execute(_UPDATE_RUN, values)

    def save_progress(
        self, run_id: int, counts: CycleCounts, watermark: Position | None, estimated: int | None
    ) -> None:
        """The counts so far of a run still going, so ``status`` shows how far it has got."""
        values = {
            "run": run_id,
            "watermark_after": describe(watermark),
            "rows_estimated": estimated,
            **counts.as_dict(),
        }
        with self._connect() as connection:  # one statement: atomic by itself
            connection.execute(_UPDATE_RUN, values)

    def close_abandoned_runs(self, now: datetime) -> int:
        """Mark runs left ``running`` by a process that died (SIGKILL, power loss) ``abandoned``.

        Called under the instance lock, so no run of this sync can really be running.
        """
        with self._connect() as connection:  # one statement: atomic by itself
            result = connection.execute(
                update(sync_runs)
                .where(
                    sync_runs.c.sync_name == self.sync_name,
                    sync_runs.c.outcome == RunOutcome.RUNNING.value,
                )
                .values(
                    outcome=RunOutcome.ABANDONED.value,
                    error="the process ended without finishing the run",
                )
            )
            return result.rowcount

    def prune(self, before: datetime, per_user: int = HISTORY_PER_USER) -> Pruned:
        """Forget runs and outcomes older than ``before``, and all but each user's newest
        ``per_user`` outcomes."""
        h = sync_history.c
        ranked = (
            select(
                h.id,
                func.row_number().over(partition_by=h.source_key, order_by=h.id.desc()).label("n"),
            )
            .where(h.sync_name == self.sync_name)
            .subquery()
        )
        surplus = select(ranked.c.id).where(ranked.c.n > per_user)
        with self._transaction() as connection:
            runs = connection.execute(
                sync_runs.delete().where(
                    sync_runs.c.sync_name == self.sync_name, sync_runs.c.started_at < before
                )
            ).rowcount
            history = connection.execute(
                sync_history.delete().where(
                    h.sync_name == self.sync_name, (h.at < before) | h.id.in_(surplus)
                )
            ).rowcount
        return Pruned(runs, history)

    # -- the audit sweep ------------------------------------------------------------------

    def audit_position(self) -> Any:
        """The key after which the audit sweep resumes (None: from the start of the table)."""
        with self._connect() as connection:
            text = connection.scalar(
                select(sync_state.c.audit_key).where(sync_state.c.sync_name == self.sync_name)
            )
        return None if text is None else decode_value(text)

    def tracked_position(self) -> str | None:
        """The status key after which the audit's check for deleted rows resumes."""
        with self._connect() as connection:
            key: str | None = connection.scalar(
                select(sync_state.c.tracked_key).where(sync_state.c.sync_name == self.sync_name)
            )
        return key

    def store_tracked_position(self, key: str | None, now: datetime) -> None:
        """Where the next check for deleted rows starts (None: at the first key again)."""
        with self._transaction() as connection:
            self._store_state(connection, now, tracked_key=key)

    def requeue(
        self, keys: Sequence[str], euids: Sequence[int | None], now: datetime, audit_key: Any
    ) -> None:
        """Mark users as due for a retry now and store where the audit resumes, in one transaction.

        The retry phase then re-reads each one's current row and pushes it. An empty attempted
        hash matches no payload, so the push is not mistaken for one already attempted.
        """
        with self._transaction() as connection:
            if keys:
                rows = [
                    self._row(
                        Update(
                            key,
                            euid,
                            Status.RETRYING,
                            None,
                            "",
                            0,
                            None,
                            "re-queued by the audit: out of step with the source",
                            None,
                            None,
                            now,
                        ),
                        now,
                    )
                    for key, euid in zip(keys, euids, strict=True)
                ]
                self._upsert_status(connection, rows)
            encoded = None if audit_key is None else encode_value(audit_key)
            self._store_state(connection, now, audit_key=encoded)

    def store_reach(self, now: datetime, key: Any, rows: int | None = None) -> Progress:
        """Store where the sweep of rows outside the cursor's reach stands: after ``key``, or
        (``key`` None) finished now, having found ``rows`` of them. The new state row."""
        with self._transaction() as connection:
            if key is not None:
                self._store_state(connection, now, reach_key=encode_value(key))
            else:
                self._store_state(
                    connection, now, reach_key=None, reach_rows=rows, reach_checked_at=now
                )
        return self.progress()

    def store_held(self, now: datetime, rows: int, ahead_by: float | None) -> Progress:
        """Store how many rows stamped ahead of the source's clock held the watermark last cycle,
        and by how many seconds the furthest was ahead. The new state row."""
        with self._connect() as connection:  # one statement: atomic by itself
            self._store_state(connection, now, held_rows=rows, held_by_s=ahead_by)
        return self.progress()

    # -- operator views -------------------------------------------------------------------

    def counts_by_status(self) -> dict[str, int]:
        c = sync_status.c
        query = (
            select(c.status, func.count()).where(c.sync_name == self.sync_name).group_by(c.status)
        )
        with self._connect() as connection:
            return {status: count for status, count in connection.execute(query)}

    def retry_queue(self, now: datetime) -> int:
        """Users whose retry is due now: the queue the next cycle's retry phase works through."""
        c = sync_status.c
        query = select(func.count()).where(
            c.sync_name == self.sync_name,
            c.status == Status.RETRYING.value,
            c.next_attempt_at <= now,
        )
        with self._connect() as connection:
            return int(connection.scalar(query) or 0)

    def last_success(self) -> datetime | None:
        """When the last cycle that ended ok with nobody left retrying finished (None: never)."""
        c = sync_runs.c
        query = select(func.max(c.finished_at)).where(
            c.sync_name == self.sync_name, c.outcome == RunOutcome.OK.value, c.retrying == 0
        )
        with self._connect() as connection:
            found: datetime | None = connection.scalar(query)
        return found

    def recent_runs(self, limit: int = 10) -> list[RunRow]:
        query = (
            select(sync_runs)
            .where(sync_runs.c.sync_name == self.sync_name)
            .order_by(sync_runs.c.id.desc())
            .limit(limit)
        )
        with self._connect() as connection:
            return [RunRow.of(row) for row in connection.execute(query)]

    def recent_problems(self, limit: int = 10) -> list[UserStatus]:
        """Users that did not reach EngageLab, most recent first: failed, retrying, skipped."""
        c = sync_status.c
        worst_first = (Status.FAILED, Status.RETRYING, Status.SKIPPED)
        rank = case({status.value: i for i, status in enumerate(worst_first)}, value=c.status)
        query = (
            select(sync_status)
            .where(c.sync_name == self.sync_name, c.status != Status.SYNCED.value)
            .order_by(rank, c.updated_at.desc(), c.source_key)
            .limit(limit)
        )
        with self._connect() as connection:
            return [UserStatus.of(row) for row in connection.execute(query)]

    def status_of(self, key: str) -> UserStatus | None:
        c = sync_status.c
        with self._connect() as connection:
            row = connection.execute(
                select(sync_status).where(c.sync_name == self.sync_name, c.source_key == key)
            ).first()
        return UserStatus.of(row) if row else None

    def status_view(self, limit: int = 10) -> StatusView:
        """Everything ``status`` shows, ``limit`` rows per list."""
        return StatusView(
            self.sync_name,
            self.progress(),
            self.counts_by_status(),
            self.recent_runs(limit),
            self.recent_problems(limit),
            self.pending_reset(),
        )

    def keys_of_euid(self, euid: int) -> list[str]:
        c = sync_status.c
        query = select(c.source_key).where(c.sync_name == self.sync_name, c.euid == euid)
        with self._connect() as connection:
            return list(connection.scalars(query.order_by(c.source_key)))

    def history(self, key: str, limit: int = HISTORY_PER_USER) -> list[HistoryEntry]:
        """A user's recorded outcomes, newest first."""
        h = sync_history.c
        query = (
            select(h.at, h.status, h.attempts, h.code, h.message, h.attempted_hash)
            .where(h.sync_name == self.sync_name, h.source_key == key)
            .order_by(h.id.desc())
            .limit(limit)
        )
        with self._connect() as connection:
            return [
                HistoryEntry(at, Status(status), attempts, code, message, hashed)
                for at, status, attempts, code, message, hashed in connection.execute(query)
            ]

    def pending_reset(self) -> tuple[Position | None] | None:
        """A watermark reset waiting for the next cycle, as a 1-tuple (None: none waits)."""
        with self._connect() as connection:
            row = connection.execute(_RESET, {"sync": self.sync_name}).first()
        if row is None or row.reset_requested_at is None:
            return None
        return (_position(row.reset_cursor, row.reset_key),)

    # -- operator requests: each bumps the epoch, so a running daemon re-reads its caches ----

    def request_reset(self, position: Position | None, now: datetime) -> None:
        """Ask the next cycle to start from ``position`` (None: the beginning)."""
        cursor = None if position is None else encode_value(position.cursor)
        key = None if position is None else encode_value(position.key)
        with self._transaction() as connection:
            self._bump(connection, now, reset_requested_at=now, reset_cursor=cursor, reset_key=key)

    def retry_now(self, keys: Sequence[str], failed: bool, now: datetime) -> int:
        """Make users due for a retry now: ``keys`` (retrying or failed), or every retrying user
        and, with ``failed``, every failed one, who gets a fresh count of attempts. How many."""
        c = sync_status.c
        chosen = [c.sync_name == self.sync_name]
        if keys:
            chosen.append(c.source_key.in_(list(keys)))
        with self._transaction() as connection:
            count = connection.execute(
                update(sync_status)
                .where(*chosen, c.status == Status.RETRYING.value)
                .values(next_attempt_at=now, updated_at=now)
            ).rowcount
            if failed or keys:
                count += connection.execute(
                    update(sync_status)
                    .where(*chosen, c.status == Status.FAILED.value)
                    .values(
                        status=Status.RETRYING.value,
                        attempts=0,
                        attempted_hash="",  # matches no payload: the retry pushes
                        last_message="retry requested by an operator",
                        next_attempt_at=now,
                        updated_at=now,
                    )
                ).rowcount
            self._bump(connection, now)
        self._known.clear()
        return int(count)

    def resync(self, keys: Sequence[str], now: datetime) -> None:
        """Push ``keys`` again whatever their hashes say: each is due for a retry now, which
        re-reads its current row. An empty hash matches no payload."""
        update_ = Update(
            "", None, Status.RETRYING, "", "", 0, None, "resync requested by an operator",
            None, None, now,
        )  # fmt: skip
        rows = [self._row(replace(update_, key=key), now) for key in keys]
        with self._transaction() as connection:
            self._upsert_status(connection, rows)
            self._bump(connection, now)

    def resync_all(self, now: datetime) -> int:
        """Push every user again: forget every hash and read the table from the beginning
        (the next cycle applies the reset). How many users were known."""
        c = sync_status.c
        with self._transaction() as connection:
            count = connection.execute(
                update(sync_status)
                .where(c.sync_name == self.sync_name)
                .values(pushed_hash="", attempted_hash="", updated_at=now)
            ).rowcount
            self._bump(connection, now, reset_requested_at=now, reset_cursor=None, reset_key=None)
        self._known.clear()
        return int(count)

    def _bump(self, connection: Connection, now: datetime, **values: Any) -> None:
        """Bump the operator epoch (creating the state row if need be), setting ``values``."""
        values["updated_at"] = now
        stmt = self._insert(sync_state).values(sync_name=self.sync_name, epoch=1, **values)
        connection.execute(
            stmt.on_conflict_do_update(
                index_elements=[sync_state.c.sync_name],
                set_={"epoch": sync_state.c.epoch + 1, **values},
            )
        )

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection in autocommit: each statement is its own transaction.

        Reads and single-statement writes need no BEGIN/COMMIT around them; an idle cycle is a
        handful of statements, and three round trips each instead of one would triple it.
        """
        with self._guard(), self._autocommit.connect() as connection:
            yield connection

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A connection inside one transaction, for writes that must land together."""
        with self._guard(), self.engine.connect() as connection, connection.begin():
            yield connection

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise StateError(
                f"the tracking database {self._where()} failed: {first_line(exc)}",
                "check state.url and that the database is reachable and migrated",
            ) from exc

    def _where(self) -> str:
        return mask_password(self.engine.url)


class RunHistory:
    """The run history as an observer of the engine (``engine.Observer``): each cycle's row of
    ``cdc_sync_runs`` gets its counts as pages land (at most every ``save_every`` seconds, and
    only for pages that wrote something, so an idle poll costs nothing more), and is closed with
    its outcome. (The engine opens it, for its id.)"""

    def __init__(
        self,
        state: StateStore,
        *,
        save_every: float = SAVE_PROGRESS_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.save_every = save_every
        self.clock = clock
        self._saved: float | None = None

    def cycle_started(self, start: CycleStart) -> None:
        self._saved = None

    def page_recorded(self, page: PageReport) -> None:
        now = self.clock()
        if page.wrote and (self._saved is None or now - self._saved >= self.save_every):
            self._saved = now
            self.state.save_progress(page.run_id, page.total, page.watermark, page.rows_estimated)

    def slice_audited(self, audit: AuditSlice) -> None:
        pass

    def cycle_finished(self, report: CycleReport) -> None:
        self.state.finish_run(
            report.run_id,
            report.finished_at,
            report.outcome,
            report.counts,
            report.watermark_after,
            report.error,
            report.replica_lag,
            report.rows_estimated,
        )


# The statements of every cycle, built once: SQLAlchemy then skips construction and cache-key
# work, which on an idle poll cost more than the round trips. Values are bound at execution.
_THIS_SYNC = sync_state.c.sync_name == bindparam("sync")
_PROGRESS = select(sync_state).where(_THIS_SYNC)
_VERSION = text(f"SELECT version_num FROM {VERSION_TABLE}")  # noqa: S608 - a constant name
# The columns are those of the row executed with; the operator epoch, and whether a watermark
# reset waits, come back with the id.
_START_RUN = insert(sync_runs).returning(
    sync_runs.c.id,
    select(sync_state.c.epoch).where(_THIS_SYNC).scalar_subquery(),
    select(sync_state.c.reset_requested_at).where(_THIS_SYNC).scalar_subquery(),
)
_UPDATE_RUN = update(sync_runs).where(sync_runs.c.id == bindparam("run"))  # SET: the other keys
_RESET = select(
    sync_state.c.reset_requested_at, sync_state.c.reset_cursor, sync_state.c.reset_key
).where(_THIS_SYNC)


def _shared_revision(connection: Connection) -> str | None:
    """cdc-sync's revision in alembic's default version table, where cdc-sync kept it before
    :data:`VERSION_TABLE`; None when that table is missing or holds only others' revisions."""
    if not inspect(connection).has_table(SHARED_VERSION_TABLE):
        return None
    held = connection.scalars(text(f"SELECT version_num FROM {SHARED_VERSION_TABLE}"))  # noqa: S608
    return next((revision for revision in held if revision in REVISIONS), None)


def _take_back_shared_revision(connection: Connection) -> str | None:
    """Move cdc-sync's revision out of ``alembic_version`` (an install older than
    :data:`VERSION_TABLE`); the revision moved, or None when there is nothing of ours to move.

    Another application's rows are left where they are; the table is dropped only when cdc-sync's
    row was all it held, which means it was cdc-sync's own.
    """
    if inspect(connection).has_table(VERSION_TABLE):
        return None
    revision = _shared_revision(connection)
    if revision is None:
        return None
    connection.execute(
        text(f"DELETE FROM {SHARED_VERSION_TABLE} WHERE version_num = :revision"),  # noqa: S608
        {"revision": revision},
    )
    if connection.scalar(text(f"SELECT count(*) FROM {SHARED_VERSION_TABLE}")) == 0:  # noqa: S608
        connection.execute(text(f"DROP TABLE {SHARED_VERSION_TABLE}"))
    log.info("version_table_moved", revision=revision, to=VERSION_TABLE)
    return revision


def _among(dialect: str, column: ColumnElement[str], values: str) -> ColumnElement[bool]:
    """``column`` is one of the bound list ``values``. On PostgreSQL the list is one array
    parameter: a thousand separate ones cost more to send and parse than the lookup itself."""
    if dialect == "postgresql":
        return column == any_(bindparam(values, type_=ARRAY(String)))
    return column.in_(bindparam(values, expanding=True))


def _records_query(dialect: str) -> Select[Any]:
    """The status rows of a page's keys."""
    c = sync_status.c
    return select(
        c.source_key, c.status, c.pushed_hash, c.attempted_hash, c.attempts, c.next_attempt_at
    ).where(c.sync_name == bindparam("sync"), _among(dialect, c.source_key, "keys"))


def _identities_query(dialect: str) -> Select[Any]:
    """The stored EUIDs of a page's identity values."""
    c = sync_identities.c
    return select(c.identity_value, c.euid).where(
        c.sync_name == bindparam("sync"),
        c.identity_name == bindparam("name"),
        _among(dialect, c.identity_value, "values"),
    )


def _recordset() -> Select[Any]:
    """``SELECT ... FROM json_to_recordset(:rows) AS r(sync_name varchar(64), ...)``: status
    rows from a page's JSON document."""
    names = [c.name for c in sync_status.c]
    typed = [
        column(name, DateTime(timezone=True) if isinstance(kind, UtcDateTime) else kind)
        for name, kind in ((name, sync_status.c[name].type) for name in names)
    ]
    rows = (
        func.json_to_recordset(cast(bindparam("rows", type_=Text), JSON))
        .table_valued(*typed)
        .render_derived(name="r", with_types=True)
    )
    return select(*(rows.c[name] for name in names))


# The history columns and the status-row columns they are filled from.
_HISTORY_FROM = {
    "sync_name": "sync_name",
    "source_key": "source_key",
    "at": "updated_at",
    "status": "status",
    "attempts": "attempts",
    "code": "last_code",
    "message": "last_message",
    "attempted_hash": "attempted_hash",
}


def _sqlite_history() -> Any:
    """Append status rows to the history, from executemany rows (SQLite; on PostgreSQL the
    upsert's CTE does it, see :meth:`StateStore._write_statements`)."""
    # Binds named after the status row's keys (_HISTORY_FROM); textual, since SQLAlchemy
    # reserves bind names equal to the columns of an INSERT.
    return text(
        "INSERT INTO cdc_sync_history"
        " (sync_name, source_key, at, status, attempts, code, message, attempted_hash)"
        " VALUES (:sync_name, :source_key, :updated_at, :status, :attempts, :last_code,"
        " :last_message, :attempted_hash)"
    ).bindparams(bindparam("updated_at", type_=UtcDateTime()))


def _position(cursor: str | None, key: str | None) -> Position | None:
    """A watermark from its stored text (None: none, the beginning)."""
    if cursor is None or key is None:
        return None
    return Position(decode_value(cursor), decode_value(key))


def _json_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their timestamps as ISO text, each distinct one formatted once (a page's
    timestamps are nearly all the same few values)."""
    texts: dict[datetime, str] = {}

    def text(value: datetime) -> str:
        found = texts.get(value)
        if found is None:
            found = texts[value] = value.isoformat()
        return found

    return [{k: text(v) if isinstance(v, datetime) else v for k, v in row.items()} for row in rows]
