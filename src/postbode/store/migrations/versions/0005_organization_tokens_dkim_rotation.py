"""organization tokens for the management API; the previous DKIM key of a domain during a
rotation's grace period

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import postbode.store.schema

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "organization_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("lookup", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=200), nullable=False),
        sa.Column("last_used_at", postbode.store.schema.UTCDateTime(), nullable=True),
        sa.Column("revoked_at", postbode.store.schema.UTCDateTime(), nullable=True),
        sa.Column("created_at", postbode.store.schema.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_organization_tokens_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organization_tokens")),
        sa.UniqueConstraint("lookup", name=op.f("uq_organization_tokens_lookup")),
    )
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("previous_dkim_selector", sa.String(length=63), nullable=True)
        )
        batch_op.add_column(sa.Column("previous_dkim_public_key", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("previous_dkim_until", postbode.store.schema.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.drop_column("previous_dkim_until")
        batch_op.drop_column("previous_dkim_public_key")
        batch_op.drop_column("previous_dkim_selector")
    op.drop_table("organization_tokens")
