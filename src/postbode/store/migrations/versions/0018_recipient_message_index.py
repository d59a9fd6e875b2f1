"""recipient message index: an address's deliveries by message id, so that the log's page of a
busy address is read from its newest end (replaces the (app_id, lower(recipient)) index)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 19:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Without message_id in the index, a page of an address with thousands of messages read
    # and sorted all of them (1.6 s for 10,900 at 10 million deliveries). Written by hand:
    # autogenerate cannot compare expression indexes on SQLite.
    op.create_index(
        "ix_deliveries_app_id_lower_recipient_message_id",
        "deliveries",
        ["app_id", sa.text("lower(recipient)"), "message_id"],
        unique=False,
    )
    # Its first two columns: the new index serves every query the old one did.
    op.drop_index("ix_deliveries_app_id_lower_recipient", table_name="deliveries")


def downgrade() -> None:
    op.create_index(
        "ix_deliveries_app_id_lower_recipient",
        "deliveries",
        ["app_id", sa.text("lower(recipient)")],
        unique=False,
    )
    op.drop_index("ix_deliveries_app_id_lower_recipient_message_id", table_name="deliveries")
