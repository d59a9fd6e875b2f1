"""names per organisation: app names unique in their organisation, domains as claims of which
at most one per name is verified, routes unique per app

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 18:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VERIFIED = sa.text("verified_at IS NOT NULL")


def _refuse_cascades() -> None:
    """SQLite changes a constraint by copying the table; dropping the old `apps` would delete
    every row that refers to it while foreign keys are enforced (postbode migrate turns them
    off around the migration and checks them after)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "this migration copies tables on SQLite: run it with `postbode migrate` "
            "(foreign keys off while it runs)"
        )


def upgrade() -> None:
    _refuse_cascades()
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_constraint("uq_apps_name", type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_apps_organization_id_name"), ["organization_id", "name"]
        )
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.drop_constraint("uq_domains_name", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_domains_app_id_name"), ["app_id", "name"])
        batch_op.create_index(batch_op.f("ix_domains_name"), ["name"], unique=False)
    op.create_index(
        "uq_domains_verified_name",
        "domains",
        ["name"],
        unique=True,
        postgresql_where=VERIFIED,
        sqlite_where=VERIFIED,
    )
    with op.batch_alter_table("routes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_routes_app_id"))
        batch_op.drop_constraint("uq_routes_pattern", type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_routes_app_id_pattern"), ["app_id", "pattern"]
        )
        batch_op.create_index(batch_op.f("ix_routes_pattern"), ["pattern"], unique=False)


def downgrade() -> None:
    # Fails (unique violation) while two organisations share an app name, a domain has more
    # than one claim, or two apps have a route of the same pattern: remove those first.
    _refuse_cascades()
    with op.batch_alter_table("routes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_routes_pattern"))
        batch_op.drop_constraint(batch_op.f("uq_routes_app_id_pattern"), type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_routes_pattern"), ["pattern"])
        batch_op.create_index(batch_op.f("ix_routes_app_id"), ["app_id"], unique=False)
    op.drop_index("uq_domains_verified_name", table_name="domains")
    with op.batch_alter_table("domains", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_domains_name"))
        batch_op.drop_constraint(batch_op.f("uq_domains_app_id_name"), type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_domains_name"), ["name"])
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_apps_organization_id_name"), type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_apps_name"), ["name"])
