"""statistics counters per template: stat_counters.template in the primary key

Counters written before this revision carry template '' (they are not split after the fact):
per-template figures count from the upgrade on.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ["app_id", "stream", "tag", "bucket", "event_type"]
AFTER = ["app_id", "stream", "tag", "template", "bucket", "event_type"]


def upgrade() -> None:
    # On SQLite the batch copies the table (nothing refers to stat_counters, so no cascade).
    with op.batch_alter_table("stat_counters", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("template", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.drop_constraint("pk_stat_counters", type_="primary")
        batch_op.create_primary_key("pk_stat_counters", AFTER)


def downgrade() -> None:
    # Rows that differ only by template are merged first, or the old key would repeat.
    bind = op.get_bind()
    keys = ", ".join(BEFORE)
    bind.execute(
        sa.text(
            "CREATE TEMPORARY TABLE stat_counters_merged AS"
            f" SELECT {keys}, SUM(count) AS count, SUM(bot_count) AS bot_count"
            f" FROM stat_counters GROUP BY {keys}"
        )
    )
    bind.execute(sa.text("DELETE FROM stat_counters"))
    with op.batch_alter_table("stat_counters", schema=None) as batch_op:
        batch_op.drop_constraint("pk_stat_counters", type_="primary")
        batch_op.drop_column("template")
        batch_op.create_primary_key("pk_stat_counters", BEFORE)
    bind.execute(
        sa.text(
            f"INSERT INTO stat_counters ({keys}, count, bot_count)"
            f" SELECT {keys}, count, bot_count FROM stat_counters_merged"
        )
    )
    bind.execute(sa.text("DROP TABLE stat_counters_merged"))
