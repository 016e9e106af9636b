"""Tracking tables: sync state (watermark), sync status (one row per user), run history.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cdc_sync.models import UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cdc_sync_state",
        sa.Column("sync_name", sa.String(64), nullable=False),
        sa.Column("cursor_value", sa.Text(), comment="watermark cursor, type-tagged JSON"),
        sa.Column("key_value", sa.Text(), comment="watermark key, type-tagged JSON"),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sync_name", name="pk_cdc_sync_state"),
        comment="Per sync: the watermark, the last (cursor, key) whose outcome is recorded.",
    )
    op.create_table(
        "cdc_sync_status",
        sa.Column("sync_name", sa.String(64), nullable=False),
        sa.Column("source_key", sa.String(256), nullable=False),
        sa.Column("euid", sa.BigInteger()),
        sa.Column(
            "status", sa.String(16), nullable=False, comment="synced | retrying | failed | skipped"
        ),
        sa.Column(
            "pushed_hash", sa.String(64), comment="hash of the last payload EngageLab accepted"
        ),
        sa.Column(
            "attempted_hash", sa.String(64), comment="hash of the payload of the last outcome"
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_code", sa.Integer(), comment="EngageLab's code of the last answer, if any"),
        sa.Column("last_message", sa.Text()),
        sa.Column("first_seen_at", UtcDateTime(), nullable=False),
        sa.Column("last_attempt_at", UtcDateTime()),
        sa.Column("last_success_at", UtcDateTime()),
        sa.Column("next_attempt_at", UtcDateTime()),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sync_name", "source_key", name="pk_cdc_sync_status"),
        comment="One row per user: what reached EngageLab, when, and why not.",
    )
    op.create_index(
        "ix_cdc_sync_status_sync_name_status_next_attempt_at",
        "cdc_sync_status",
        ["sync_name", "status", "next_attempt_at"],
    )
    op.create_index(
        "ix_cdc_sync_status_sync_name_updated_at", "cdc_sync_status", ["sync_name", "updated_at"]
    )
    op.create_table(
        "cdc_sync_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sync_name", sa.String(64), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("finished_at", UtcDateTime()),
        sa.Column(
            "outcome",
            sa.String(16),
            nullable=False,
            comment="running | ok | stopped | fatal | error",
        ),
        sa.Column("rows_read", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pushed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("unchanged", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("retrying", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("deferred", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("watermark_before", sa.Text()),
        sa.Column("watermark_after", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_cdc_sync_runs"),
        comment="One row per cycle.",
    )
    op.create_index(
        "ix_cdc_sync_runs_sync_name_started_at", "cdc_sync_runs", ["sync_name", "started_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_cdc_sync_runs_sync_name_started_at", table_name="cdc_sync_runs")
    op.drop_table("cdc_sync_runs")
    op.drop_index("ix_cdc_sync_status_sync_name_updated_at", table_name="cdc_sync_status")
    op.drop_index(
        "ix_cdc_sync_status_sync_name_status_next_attempt_at", table_name="cdc_sync_status"
    )
    op.drop_table("cdc_sync_status")
    op.drop_table("cdc_sync_state")
