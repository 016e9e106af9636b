"""Rows outside the cursor's reach, the horizon of the read behind the watermark, held rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cdc_sync.models import UtcDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = [
    ("horizon_value", sa.Text(), "what the read behind the watermark saw, type-tagged"),
    ("reach_key", sa.Text(), "where the sweep of rows outside the cursor's reach resumes"),
    ("reach_rows", sa.Integer(), "rows with a NULL or infinite cursor at the last sweep"),
    ("reach_checked_at", UtcDateTime(), "when the last sweep of those rows finished"),
    ("held_rows", sa.Integer(), "rows ahead of the source's clock holding the watermark"),
    ("held_by_s", sa.Float(), "how far the furthest of them is ahead, in seconds"),
]


def upgrade() -> None:
    with op.batch_alter_table("cdc_sync_state") as table:
        for name, kind, comment in COLUMNS:
            table.add_column(sa.Column(name, kind, comment=comment))


def downgrade() -> None:
    with op.batch_alter_table("cdc_sync_state") as table:
        for name, _, _ in reversed(COLUMNS):
            table.drop_column(name)
