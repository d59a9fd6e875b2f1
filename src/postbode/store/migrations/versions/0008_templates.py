"""templates: templates with their versions, A/B tests with their variants; messages say which
template, version and variant made them and when they were scheduled for

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("live_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_templates_app_id_apps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        sa.UniqueConstraint("app_id", "alias", name=op.f("uq_templates_app_id_alias")),
    )
    op.create_table(
        "template_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("layout", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["templates.id"],
            name=op.f("fk_template_versions_template_id_templates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_versions")),
        sa.UniqueConstraint(
            "template_id", "version", name=op.f("uq_template_versions_template_id_version")
        ),
    )
    op.create_table(
        "ab_tests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sa.Integer(), nullable=False),
        sa.Column("template_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("winner", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["app_id"], ["apps.id"], name=op.f("fk_ab_tests_app_id_apps"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["templates.id"],
            name=op.f("fk_ab_tests_template_id_templates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ab_tests")),
    )
    with op.batch_alter_table("ab_tests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ab_tests_template_id_status"), ["template_id", "status"], unique=False
        )
    op.create_table(
        "ab_variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("test_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["test_id"],
            ["ab_tests.id"],
            name=op.f("fk_ab_variants_test_id_ab_tests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ab_variants")),
        sa.UniqueConstraint("test_id", "name", name=op.f("uq_ab_variants_test_id_name")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("template_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ab_test_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ab_variant", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("send_at", sa.DateTime(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_messages_app_id_template_received_at"),
            ["app_id", "template", "received_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_messages_ab_test_id_ab_variant"),
            ["ab_test_id", "ab_variant"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_messages_ab_test_id_ab_variant"))
        batch_op.drop_index(batch_op.f("ix_messages_app_id_template_received_at"))
        for column in ("send_at", "ab_variant", "ab_test_id", "template_version", "template"):
            batch_op.drop_column(column)
    op.drop_table("ab_variants")
    with op.batch_alter_table("ab_tests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ab_tests_template_id_status"))
    op.drop_table("ab_tests")
    op.drop_table("template_versions")
    op.drop_table("templates")
