"""shared shaping: per-destination rate and slow-down state, and leased connection slots per
MX host, so the limits hold for every worker process on every node

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import postbode.store.schema

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "destination_state",
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("tat", sa.Float(), nullable=False),
        sa.Column("slow_low", sa.Float(), server_default="1.0", nullable=False),
        sa.Column("slow_last_signal", sa.Float(), nullable=True),
        sa.Column("slow_lowered_at", sa.Float(), nullable=True),
        sa.Column("slow_reason", sa.String(length=64), server_default="", nullable=False),
        sa.Column("slow_since", postbode.store.schema.UTCDateTime(), nullable=True),
        sa.Column("used_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_destination_state")),
    )
    op.create_table(
        "connection_slots",
        sa.Column("host", sa.String(length=253), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("host", "slot", name=op.f("pk_connection_slots")),
    )


def downgrade() -> None:
    op.drop_table("connection_slots")
    op.drop_table("destination_state")
