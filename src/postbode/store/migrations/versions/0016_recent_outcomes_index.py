"""recent outcomes index: an app's deliveries in a state by the time they changed (the hard
bounces of the last hour that sending health and the bounce guard count)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 19:05:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Without it the count read every bounced delivery of the app: 0.3-0.9 s per app at
    # 10 million deliveries, on every dashboard and every guard run.
    op.create_index(
        "ix_deliveries_app_id_status_updated_at",
        "deliveries",
        ["app_id", "status", "updated_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_app_id_status_updated_at", table_name="deliveries")
