"""messages app/tag statistics: on PostgreSQL, the joint distribution of (app_id, tag), so the
planner knows a tag belongs to some apps only

Tags are an app's own (`invoice` in the shop and billing, none in the forum): estimated column
by column, the forum's `invoice` messages came to a third of a million, and the log's state +
tag count read the deliveries' whole message-id index (1 s at 10 M) to find none. SQLite keeps
no such statistics (its planner reads the index's own, sqlite_stat1).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-08 00:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "st_messages_app_id_tag"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(f"CREATE STATISTICS {NAME} (mcv, ndistinct) ON app_id, tag FROM messages")
    # Filled now where messages were analysed before (sampled: about a second at 10 M), not in
    # a new database: analysed empty, the planner would take the table for empty while it
    # fills, until autovacuum analyses it (PostgreSQL's CPU per relayed message rose by 25 %).
    analysed = bind.execute(
        sa.text("SELECT reltuples FROM pg_class WHERE oid = 'messages'::regclass")
    ).scalar()
    if analysed is not None and analysed > 0:
        op.execute("ANALYZE messages")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP STATISTICS IF EXISTS {NAME}")
