"""The status column's comment names the status of a user who left the sync.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "synced | retrying | failed | skipped"
AFTER = "synced | retrying | failed | skipped | left"


def upgrade() -> None:
    _comment(AFTER, BEFORE)


def downgrade() -> None:
    _comment(BEFORE, AFTER)


def _comment(comment: str, existing: str) -> None:
    if op.get_bind().dialect.name == "sqlite":  # SQLite keeps no comments: nothing to copy over
        return
    op.alter_column(
        "cdc_sync_status",
        "status",
        existing_type=sa.String(16),
        existing_nullable=False,
        comment=comment,
        existing_comment=existing,
    )
