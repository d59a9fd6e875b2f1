"""organisation time zone: the dashboard's "today" and custom ranges are read in it

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 16:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN only (no batch copy of `organizations`: its rows are referred to).
    op.add_column(
        "organizations",
        sa.Column("time_zone", sa.String(length=64), server_default="UTC", nullable=False),
    )


def downgrade() -> None:
    # ALTER TABLE … DROP COLUMN (SQLite 3.35+): a batch copy would cascade-delete the apps.
    op.drop_column("organizations", "time_zone")
