"""log state indexes: an app's deliveries in a walked state, and with a bounce category, by
message id (partial: delivered, queued and sending rows and rows without a category are not
in them), so the log's state and category filters read a page from the newest end

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07 21:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WALKED = "status IN ('deferred', 'bounced', 'failed', 'suppressed', 'held', 'cancelled')"


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_app_id_status_message_id",
        "deliveries",
        ["app_id", "status", "message_id"],
        unique=False,
        sqlite_where=sa.text(WALKED),
        postgresql_where=sa.text(WALKED),
    )
    op.create_index(
        "ix_deliveries_app_id_bounce_category_message_id",
        "deliveries",
        ["app_id", "bounce_category", "message_id"],
        unique=False,
        sqlite_where=sa.text("bounce_category IS NOT NULL"),
        postgresql_where=sa.text("bounce_category IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_app_id_bounce_category_message_id", table_name="deliveries")
    op.drop_index("ix_deliveries_app_id_status_message_id", table_name="deliveries")
