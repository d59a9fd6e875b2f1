"""privacy: organisation retention defaults, per-app body storage and tracking switches,
messages whose addresses were hashed, and the retention work lists (partial indexes)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN only: on SQLite, a batch operation that copies `apps` or `messages` would
    # drop the old table, and with foreign keys on that deletes every row referring to it.
    op.add_column(
        "organizations",
        sa.Column("raw_retention_days", sa.Integer(), server_default="7", nullable=False),
    )
    op.add_column(
        "organizations",
        sa.Column("metadata_retention_days", sa.Integer(), server_default="90", nullable=False),
    )
    op.add_column(
        "organizations",
        sa.Column("audit_retention_days", sa.Integer(), server_default="365", nullable=False),
    )
    op.add_column(
        "apps", sa.Column("store_bodies", sa.Boolean(), server_default=sa.true(), nullable=False)
    )
    op.add_column(
        "apps",
        sa.Column("tracking_allowed", sa.Boolean(), server_default=sa.true(), nullable=False),
    )
    op.add_column("messages", sa.Column("addresses_hashed_at", sa.DateTime(), nullable=True))
    op.create_index(
        "ix_messages_raw_kept",
        "messages",
        ["app_id", "received_at"],
        sqlite_where=sa.text("raw_purged_at IS NULL"),
        postgresql_where=sa.text("raw_purged_at IS NULL"),
    )
    op.create_index(
        "ix_messages_addresses_kept",
        "messages",
        ["app_id", "received_at"],
        sqlite_where=sa.text("addresses_hashed_at IS NULL"),
        postgresql_where=sa.text("addresses_hashed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_addresses_kept", table_name="messages")
    op.drop_index("ix_messages_raw_kept", table_name="messages")
    # Plain DROP COLUMN (SQLite 3.35 and later have it), for the reason given above.
    op.drop_column("messages", "addresses_hashed_at")
    op.drop_column("apps", "tracking_allowed")
    op.drop_column("apps", "store_bodies")
    op.drop_column("organizations", "audit_retention_days")
    op.drop_column("organizations", "metadata_retention_days")
    op.drop_column("organizations", "raw_retention_days")
