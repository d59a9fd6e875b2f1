"""inbound content score: rspamd's score and symbols on inbound messages, as on messages

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("inbound_messages", sa.Column("spam_score", sa.Float(), nullable=True))
    op.add_column("inbound_messages", sa.Column("spam_symbols", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("inbound_messages", "spam_symbols")
    op.drop_column("inbound_messages", "spam_score")
