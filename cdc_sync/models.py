"""The tracking tables, as SQLAlchemy Core metadata. Alembic migrations create them; tests check
that the migrations and this module never drift apart.

They live in the state database only, never in the source. They hold hashes of payloads, not the
contact values themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

from cdc_sync.outcomes import CycleCounts, RunOutcome

ROWS_ESTIMATED = "rows: how many the scan expected to read, estimated when it met a backlog"

VERSION_TABLE = "cdc_sync_alembic_version"
"""Where alembic keeps the tracking tables' revision. Not alembic's default, ``alembic_version``:
a shared PostgreSQL database often holds another alembic application, whose revisions that table
already holds, and alembic refuses a version table that names revisions it does not know.
It lives beside the tracking tables, in the connection's default schema."""

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no zone; we put UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


sync_state = Table(
    "cdc_sync_state",
    metadata,
    Column("sync_name", String(64), primary_key=True),
    Column("cursor_value", Text, comment="watermark cursor, type-tagged text"),
    Column("key_value", Text, comment="watermark key, type-tagged text"),
    Column("audit_key", Text, comment="where the audit sweep resumes, type-tagged text"),
    Column("tracked_key", Text, comment="where the audit's check for deleted rows resumes"),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("horizon_value", Text, comment="what the read behind the watermark saw, type-tagged"),
    Column("reach_key", Text, comment="where the sweep of rows outside the cursor's reach resumes"),
    Column("reach_rows", Integer, comment="rows with a NULL or infinite cursor at the last sweep"),
    Column("reach_checked_at", UtcDateTime, comment="when the last sweep of those rows finished"),
    Column("held_rows", Integer, comment="rows ahead of the source's clock holding the watermark"),
    Column("held_by_s", Float, comment="how far the furthest of them is ahead, in seconds"),
    Column(
        "epoch",
        Integer,
        nullable=False,
        server_default="0",
        comment="bumped by each operator command; the daemon re-reads what it caches",
    ),
    Column(
        "reset_requested_at",
        UtcDateTime,
        comment="a watermark reset the next cycle applies (NULL: none)",
    ),
    Column("reset_cursor", Text, comment="the reset's cursor (NULL: the beginning)"),
    Column("reset_key", Text, comment="the reset's key"),
    comment="Per sync: the watermark, the last (cursor, key) whose outcome is recorded.",
)

sync_status = Table(
    "cdc_sync_status",
    metadata,
    Column("sync_name", String(64), primary_key=True),
    Column("source_key", String(256), primary_key=True),
    Column("euid", BigInteger),
    Column(
        "status", String(16), nullable=False, comment="synced | retrying | failed | skipped | left"
    ),
    Column("pushed_hash", String(64), comment="hash of the last payload EngageLab accepted"),
    Column("attempted_hash", String(64), comment="hash of the payload of the last outcome"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_code", Integer, comment="EngageLab's code of the last answer, if any"),
    Column("last_message", Text),
    Column("first_seen_at", UtcDateTime, nullable=False),
    Column("last_attempt_at", UtcDateTime),
    Column("last_success_at", UtcDateTime),
    Column("next_attempt_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(None, "sync_name", "status", "next_attempt_at"),
    Index(None, "sync_name", "updated_at"),
    comment="One row per user: what reached EngageLab, when, and why not.",
)

sync_runs = Table(
    "cdc_sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sync_name", String(64), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("outcome", String(16), nullable=False, comment=" | ".join(RunOutcome)),
    *(
        Column(name, Integer, nullable=False, server_default="0", comment=CycleCounts.comment(name))
        for name in CycleCounts.names()
    ),
    Column("rows_estimated", Integer, comment=ROWS_ESTIMATED),
    Column("replica_lag_s", Float, comment="source replay lag at the start of the cycle"),
    Column("watermark_before", Text),
    Column("watermark_after", Text),
    Column("error", Text),
    Index(None, "sync_name", "started_at"),
    comment="One row per cycle.",
)

sync_history = Table(
    "cdc_sync_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sync_name", String(64), nullable=False),
    Column("source_key", String(256), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("code", Integer),
    Column("message", Text),
    Column("attempted_hash", String(64)),
    Index(None, "sync_name", "source_key", "id"),
    comment="Each user's recent outcomes, newest kept; pruned with the run history.",
)

sync_identities = Table(
    "cdc_sync_identities",
    metadata,
    Column("sync_name", String(64), primary_key=True),
    Column("identity_name", String(16), primary_key=True, comment="user_id | anonymous_id | ..."),
    Column("identity_value", String(256), primary_key=True),
    Column("euid", BigInteger, nullable=False, comment="the EUID register gave for the value"),
    Column("resolved_at", UtcDateTime, nullable=False),
    comment="Per sync: the EUID of every identity value resolved (source.identity), for good.",
)
