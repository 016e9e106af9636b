"""The EUIDs resolved for identity values (source.identity).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cdc_sync.models import UtcDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cdc_sync_identities",
        sa.Column("sync_name", sa.String(64), nullable=False),
        sa.Column(
            "identity_name",
            sa.String(16),
            nullable=False,
            comment="user_id | anonymous_id | ...",
        ),
        sa.Column("identity_value", sa.String(256), nullable=False),
        sa.Column(
            "euid", sa.BigInteger(), nullable=False, comment="the EUID register gave for the value"
        ),
        sa.Column("resolved_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint(
            "sync_name", "identity_name", "identity_value", name="pk_cdc_sync_identities"
        ),
        comment="Per sync: the EUID of every identity value resolved (source.identity), for good.",
    )


def downgrade() -> None:
    op.drop_table("cdc_sync_identities")
