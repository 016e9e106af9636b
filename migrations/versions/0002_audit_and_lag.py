"""Audit sweep position and counts, and the source's replica lag per run.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cdc_sync_state") as table:
        table.add_column(
            sa.Column(
                "audit_key", sa.Text(), comment="where the audit sweep resumes, type-tagged text"
            )
        )
        table.alter_column(
            "cursor_value",
            existing_type=sa.Text(),
            comment="watermark cursor, type-tagged text",
            existing_comment="watermark cursor, type-tagged JSON",
        )
        table.alter_column(
            "key_value",
            existing_type=sa.Text(),
            comment="watermark key, type-tagged text",
            existing_comment="watermark key, type-tagged JSON",
        )
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.add_column(
            sa.Column("audit_checked", sa.Integer(), nullable=False, server_default="0")
        )
        table.add_column(
            sa.Column(
                "audit_misses",
                sa.Integer(),
                nullable=False,
                server_default="0",
                comment="users the audit found out of step and re-queued",
            )
        )
        table.add_column(
            sa.Column(
                "replica_lag_s", sa.Float(), comment="source replay lag at the start of the cycle"
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.drop_column("replica_lag_s")
        table.drop_column("audit_misses")
        table.drop_column("audit_checked")
    with op.batch_alter_table("cdc_sync_state") as table:
        table.drop_column("audit_key")
        table.alter_column(
            "key_value",
            existing_type=sa.Text(),
            comment="watermark key, type-tagged JSON",
            existing_comment="watermark key, type-tagged text",
        )
        table.alter_column(
            "cursor_value",
            existing_type=sa.Text(),
            comment="watermark cursor, type-tagged JSON",
            existing_comment="watermark cursor, type-tagged text",
        )
