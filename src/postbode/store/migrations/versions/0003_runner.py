"""runner: periodic tasks' turns in worker_roles; on PostgreSQL, a NOTIFY when work is queued

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, channel, statuses that make a row due): a commit that queues due work NOTIFYs the
# channel, which every idle worker on every node LISTENs to (runner/wakeup.py). Statement-level
# on INSERT; on UPDATE only for rows that became due now (not claims, not later retries).
# NOTIFY folds identical notifications of one transaction into one.
QUEUES = [
    ("deliveries", "postbode_deliveries", ("queued", "deferred")),
    ("webhook_requests", "postbode_webhook_requests", ("pending",)),
    ("inbound_messages", "postbode_inbound_messages", ("pending",)),
]


def upgrade() -> None:
    with op.batch_alter_table("worker_roles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_run_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("last_duration_ms", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("runs", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))

    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION postbode_notify_queued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_ARGV[0], '');
            RETURN NULL;
        END
        $$
        """
    )
    for table, channel, due in QUEUES:
        statuses = ", ".join(f"'{s}'" for s in due)
        op.execute(
            f"CREATE TRIGGER {table}_queued_insert AFTER INSERT ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION postbode_notify_queued('{channel}')"
        )
        # Timestamps are stored as naive UTC; a second's grace for clocks a little apart.
        op.execute(
            f"CREATE TRIGGER {table}_queued_update AFTER UPDATE OF status, next_attempt_at "
            f"ON {table} FOR EACH ROW WHEN ("
            f"NEW.status IN ({statuses}) "
            f"AND NEW.next_attempt_at <= (now() AT TIME ZONE 'UTC') + interval '1 second' "
            f"AND (OLD.status IS DISTINCT FROM NEW.status "
            f"OR OLD.next_attempt_at IS DISTINCT FROM NEW.next_attempt_at)) "
            f"EXECUTE FUNCTION postbode_notify_queued('{channel}')"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, _, _ in QUEUES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_queued_update ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_queued_insert ON {table}")
        op.execute("DROP FUNCTION IF EXISTS postbode_notify_queued()")
    with op.batch_alter_table("worker_roles", schema=None) as batch_op:
        batch_op.drop_column("failures")
        batch_op.drop_column("runs")
        batch_op.drop_column("last_duration_ms")
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_run_at")
