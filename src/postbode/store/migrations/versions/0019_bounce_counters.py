"""bounce counters: delivery.bounced per app, stream, tag, minute, category and hardness, so the
dashboards' top bounce reasons read a few hundred counter rows instead of the window's events

Filled from the delivery.bounced events the store holds (one indexed read of those events,
joined to their messages for the stream and tag); stats.rollup compacts the rows as it does
stat_counters', from the oldest on.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07 21:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The minute of the event, the category it names ("unknown": none) and its hardness, per dialect
# (SQLite stores instants as 'YYYY-MM-DD HH:MM:SS.ffffff' text).
_BACKFILL = {
    "postgresql": (
        "date_trunc('minute', e.created_at)",
        "COALESCE(e.data ->> 'category', 'unknown')",
        "COALESCE((e.data ->> 'hard')::boolean, false)",
    ),
    "sqlite": (
        "substr(e.created_at, 1, 16) || '\\:00.000000'",  # \: not a bind parameter
        "COALESCE(json_extract(e.data, '$.category'), 'unknown')",
        "COALESCE(json_extract(e.data, '$.hard'), 0) != 0",
    ),
}
WATERMARKS = "stats.bounces_compacted_until.%"  # stats/rollup.py


def upgrade() -> None:
    op.create_table(
        "bounce_counters",
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("tag", sa.String(length=100), nullable=False),
        sa.Column("bucket", sa.DateTime(), nullable=False),
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("hard", sa.Boolean(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_bounce_counters_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "app_id", "stream", "tag", "bucket", "category", "hard", name=op.f("pk_bounce_counters")
        ),
    )
    op.create_index(
        op.f("ix_bounce_counters_app_id_bucket"), "bounce_counters", ["app_id", "bucket"]
    )
    bind = op.get_bind()
    bucket, category, hard = _BACKFILL[bind.dialect.name]
    # App by app, so the events' (app_id, type, created_at) index finds the bounces (the type
    # alone has no index). Events whose message retention removed still count, as they did in
    # stat_counters, in the transactional stream when no message says otherwise.
    for (app_id,) in bind.execute(sa.text("SELECT id FROM apps ORDER BY id")).all():
        bind.execute(
            sa.text(
                "INSERT INTO bounce_counters (app_id, stream, tag, bucket, category, hard, count)"
                f" SELECT e.app_id, COALESCE(m.stream, 'transactional'), COALESCE(m.tag, ''),"
                f" {bucket}, {category}, {hard}, count(*)"
                " FROM events e LEFT JOIN messages m ON m.id = e.message_id"
                " WHERE e.app_id = :app AND e.type = 'delivery.bounced'"
                " GROUP BY 1, 2, 3, 4, 5, 6"
            ),
            {"app": app_id},
        )
    # The rows are minutes: stats.rollup compacts them from the oldest on (a watermark left by
    # an earlier upgrade and downgrade would leave them as they are).
    bind.execute(sa.text(f"DELETE FROM system_values WHERE name LIKE '{WATERMARKS}'"))


def downgrade() -> None:
    op.get_bind().execute(sa.text(f"DELETE FROM system_values WHERE name LIKE '{WATERMARKS}'"))
    op.drop_index(op.f("ix_bounce_counters_app_id_bucket"), table_name="bounce_counters")
    op.drop_table("bounce_counters")
