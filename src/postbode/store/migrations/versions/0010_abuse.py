"""abuse: app holds, sending limits of apps and credentials, alerts, limit counters, content
scores of messages

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIMITS = ("limit_per_minute", "limit_per_hour", "limit_per_day")


def upgrade() -> None:
    # ADD COLUMN only: on SQLite, a batch operation that copies `apps` or `messages` would
    # drop the old table, and with foreign keys on that deletes every row referring to it.
    op.add_column("apps", sa.Column("hold_reason", sa.Text(), nullable=True))
    op.add_column("apps", sa.Column("held_at", sa.DateTime(), nullable=True))
    op.add_column("apps", sa.Column("held_by", sa.String(length=320), nullable=True))
    for table in ("apps", "credentials"):
        for name in LIMITS:
            op.add_column(table, sa.Column(name, sa.Integer(), nullable=True))
    op.add_column("messages", sa.Column("spam_score", sa.Float(), nullable=True))
    op.add_column("messages", sa.Column("spam_symbols", sa.JSON(), nullable=True))
    op.create_table(
        "app_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_app_alerts_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_alerts")),
    )
    op.create_index(op.f("ix_app_alerts_app_id_created_at"), "app_alerts", ["app_id", "created_at"])
    op.create_table(
        "alert_state",
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("last_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_alert_state_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("app_id", "kind", name=op.f("pk_alert_state")),
    )
    op.create_table(
        "send_counters",
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("bucket", sa.DateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "period", "bucket", name=op.f("pk_send_counters")),
    )
    op.create_index(op.f("ix_send_counters_bucket"), "send_counters", ["bucket"])


def downgrade() -> None:
    op.drop_index(op.f("ix_send_counters_bucket"), table_name="send_counters")
    op.drop_table("send_counters")
    op.drop_table("alert_state")
    op.drop_index(op.f("ix_app_alerts_app_id_created_at"), table_name="app_alerts")
    op.drop_table("app_alerts")
    # Plain DROP COLUMN (SQLite 3.35 and later have it), for the reason given above.
    op.drop_column("messages", "spam_symbols")
    op.drop_column("messages", "spam_score")
    for table in ("credentials", "apps"):
        for name in reversed(LIMITS):
            op.drop_column(table, name)
    op.drop_column("apps", "held_by")
    op.drop_column("apps", "held_at")
    op.drop_column("apps", "hold_reason")
