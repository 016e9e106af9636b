"""Operator requests (an epoch the daemon reads each cycle, a pending watermark reset) and a
bounded per-user history of outcomes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cdc_sync.models import UtcDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cdc_sync_state") as table:
        table.add_column(
            sa.Column(
                "epoch",
                sa.Integer(),
                nullable=False,
                server_default="0",
                comment="bumped by each operator command; the daemon re-reads what it caches",
            )
        )
        table.add_column(
            sa.Column(
                "reset_requested_at",
                UtcDateTime(),
                comment="a watermark reset the next cycle applies (NULL: none)",
            )
        )
        table.add_column(
            sa.Column("reset_cursor", sa.Text(), comment="the reset's cursor (NULL: the beginning)")
        )
        table.add_column(sa.Column("reset_key", sa.Text(), comment="the reset's key"))
    op.create_table(
        "cdc_sync_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sync_name", sa.String(64), nullable=False),
        sa.Column("source_key", sa.String(256), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("code", sa.Integer()),
        sa.Column("message", sa.Text()),
        sa.Column("attempted_hash", sa.String(64)),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cdc_sync_history")),
        comment="Each user's recent outcomes, newest kept; pruned with the run history.",
    )
    op.create_index(
        op.f("ix_cdc_sync_history_sync_name_source_key_id"),
        "cdc_sync_history",
        ["sync_name", "source_key", "id"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_cdc_sync_history_sync_name_source_key_id"), "cdc_sync_history")
    op.drop_table("cdc_sync_history")
    with op.batch_alter_table("cdc_sync_state") as table:
        table.drop_column("reset_key")
        table.drop_column("reset_cursor")
        table.drop_column("reset_requested_at")
        table.drop_column("epoch")
