"""Where the audit's check for deleted rows resumes; the status comment names ``left``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "synced | retrying | failed | skipped"
AFTER = "synced | retrying | failed | skipped | left"


def upgrade() -> None:
    with op.batch_alter_table("cdc_sync_state") as table:
        table.add_column(
            sa.Column(
                "tracked_key",
                sa.Text(),
                comment="where the audit's check for deleted rows resumes",
            )
        )
    _comment(AFTER, BEFORE)


def downgrade() -> None:
    _comment(BEFORE, AFTER)
    with op.batch_alter_table("cdc_sync_state") as table:
        table.drop_column("tracked_key")


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
