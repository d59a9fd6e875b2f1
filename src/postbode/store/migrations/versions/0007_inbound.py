"""inbound: routes with an action, format and signing secret; inbound messages with their
verification and queue columns; the hand-off attempt log; domains that take inbound mail

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 12:00:00

The routes and inbound_messages tables of 0001 were never written to: they are replaced.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "postbode_inbound_messages"


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.drop_table("inbound_messages")  # its NOTIFY triggers (0003) go with it
    op.drop_table("routes")
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("inbound", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_table(
        "routes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("pattern", sa.String(length=320), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=True),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_routes_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routes")),
        sa.UniqueConstraint("pattern", name=op.f("uq_routes_pattern")),
    )
    with op.batch_alter_table("routes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_routes_app_id"), ["app_id"], unique=False)
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("route_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("mail_from", sa.String(length=320), nullable=False),
        sa.Column("rcpt_to", sa.String(length=320), nullable=False),
        sa.Column("mailbox_hash", sa.String(length=320), nullable=False),
        sa.Column("from_header", sa.String(length=998), nullable=False),
        sa.Column("subject", sa.String(length=998), nullable=False),
        sa.Column("message_id_header", sa.String(length=998), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("client_ip", sa.String(length=45), nullable=True),
        sa.Column("helo", sa.String(length=255), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("verification", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("queued_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_inbound_messages_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["route_id"],
            ["routes.id"],
            name=op.f("fk_inbound_messages_route_id_routes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
    )
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        for columns in (
            ["status", "next_attempt_at"],
            ["app_id", "received_at"],
            ["app_id", "status", "id"],
            ["lease_until"],
        ):
            batch_op.create_index(
                batch_op.f("ix_inbound_messages_" + "_".join(columns)), columns, unique=False
            )
    op.create_table(
        "inbound_attempts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("inbound_id", sa.Uuid(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["inbound_id"],
            ["inbound_messages.id"],
            name=op.f("fk_inbound_attempts_inbound_id_inbound_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_attempts")),
    )
    with op.batch_alter_table("inbound_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_inbound_attempts_inbound_id"), ["inbound_id"], unique=False
        )
    if postgresql:
        _notify_triggers()


def _notify_triggers() -> None:
    """As 0003: a commit that queues inbound messages wakes idle workers on every node."""
    op.execute(
        "CREATE TRIGGER inbound_messages_queued_insert AFTER INSERT ON inbound_messages "
        f"FOR EACH STATEMENT EXECUTE FUNCTION postbode_notify_queued('{CHANNEL}')"
    )
    op.execute(
        "CREATE TRIGGER inbound_messages_queued_update AFTER UPDATE OF status, next_attempt_at "
        "ON inbound_messages FOR EACH ROW WHEN ("
        "NEW.status IN ('pending') "
        "AND NEW.next_attempt_at <= (now() AT TIME ZONE 'UTC') + interval '1 second' "
        "AND (OLD.status IS DISTINCT FROM NEW.status "
        "OR OLD.next_attempt_at IS DISTINCT FROM NEW.next_attempt_at)) "
        f"EXECUTE FUNCTION postbode_notify_queued('{CHANNEL}')"
    )


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.drop_table("inbound_attempts")
    op.drop_table("inbound_messages")
    op.drop_table("routes")
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.drop_column("inbound")
    op.create_table(
        "routes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("pattern", sa.String(length=320), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("endpoint_url", sa.String(length=2000), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_routes_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routes")),
        sa.UniqueConstraint("pattern", name=op.f("uq_routes_pattern")),
    )
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("route_id", sa.Integer(), nullable=True),
        sa.Column("mail_from", sa.String(length=320), nullable=False),
        sa.Column("rcpt_to", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.String(length=998), nullable=False),
        sa.Column("message_id_header", sa.String(length=998), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_inbound_messages_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["route_id"],
            ["routes.id"],
            name=op.f("fk_inbound_messages_route_id_routes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
    )
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_inbound_messages_app_id_received_at"),
            ["app_id", "received_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_inbound_messages_status_next_attempt_at"),
            ["status", "next_attempt_at"],
            unique=False,
        )
    if postgresql:
        _notify_triggers()
