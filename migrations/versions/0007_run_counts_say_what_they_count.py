"""Run history: counts say what they count, pushed is synced, users who left, the scan's
estimated rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out, not imported: a migration states the schema of its day.
COMMENTS = {
    "rows_read": "rows: read from the source, by the scan and for retries",
    "synced": "users: sent and accepted by EngageLab",
    "unchanged": "users: nothing new to send",
    "retrying": "users: sent, failed transiently, to be tried again",
    "deferred": "users: a retry pending, not yet due",
    "failed": "users: sent, failed permanently or retries exhausted",
    "skipped": "users: not sendable (bad key or euid, a bad value, no contacts)",
    "audit_checked": "rows: compared by the audit with the tracking table",
    "audit_misses": "users: found out of step by the audit and re-queued",
}
OLD_AUDIT_MISSES = "users the audit found out of step and re-queued"
OUTCOMES = "running | ok | stopped | fatal | error | abandoned"
OLD_OUTCOMES = "running | ok | stopped | fatal | error"
LEFT = "users: left the sync (consent withdrawn, deleted): cleared in EngageLab, or recorded"
REGISTERED = "users: given an EUID by register (source.identity)"
ROWS_ESTIMATED = "rows: how many the scan expected to read, estimated when it met a backlog"


def upgrade() -> None:
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.alter_column("pushed", new_column_name="synced", existing_type=sa.Integer())
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.alter_column(
            "outcome",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment=OUTCOMES,
            existing_comment=OLD_OUTCOMES,
        )
        for name, comment in COMMENTS.items():
            table.alter_column(
                name,
                existing_type=sa.Integer(),
                existing_nullable=False,
                existing_server_default="0",
                comment=comment,
                existing_comment=OLD_AUDIT_MISSES if name == "audit_misses" else None,
            )
        left = sa.Column("left", sa.Integer(), nullable=False, server_default="0", comment=LEFT)
        table.add_column(left)
        registered = sa.Column(
            "registered", sa.Integer(), nullable=False, server_default="0", comment=REGISTERED
        )
        table.add_column(registered)
        table.add_column(sa.Column("rows_estimated", sa.Integer(), comment=ROWS_ESTIMATED))


def downgrade() -> None:
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.drop_column("rows_estimated")
        table.drop_column("registered")
        table.drop_column("left")
        for name, comment in COMMENTS.items():
            table.alter_column(
                name,
                existing_type=sa.Integer(),
                existing_nullable=False,
                existing_server_default="0",
                comment=OLD_AUDIT_MISSES if name == "audit_misses" else None,
                existing_comment=comment,
            )
        table.alter_column(
            "outcome",
            existing_type=sa.String(16),
            existing_nullable=False,
            comment=OLD_OUTCOMES,
            existing_comment=OUTCOMES,
        )
    with op.batch_alter_table("cdc_sync_runs") as table:
        table.alter_column("synced", new_column_name="pushed", existing_type=sa.Integer())
