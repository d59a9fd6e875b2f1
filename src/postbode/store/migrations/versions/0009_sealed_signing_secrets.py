"""sealed signing secrets: the secrets of webhooks and inbound routes, kept in clear so far,
are encrypted at rest under a key derived from the installation's secret key

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09 12:00:00

The secret key is the configured one (POSTBODE_SECRET_KEY, handed over by `migrate`), else the
one generated and kept in `system_values`, else a new one kept there now, as
`store.engine.installation_secret` would make it.
"""

import secrets as random
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from postbode.store.sealing import derive_key, is_sealed, seal_with, unseal_with

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

system_values = sa.table("system_values", sa.column("name"), sa.column("value"))
webhooks = sa.table("webhooks", sa.column("id"), sa.column("secret"), sa.column("previous_secret"))
routes = sa.table("routes", sa.column("id"), sa.column("secret"))


def _key(conn: sa.Connection) -> bytes:
    configured = context.config.attributes.get("installation_secret")
    if configured:
        return derive_key(configured)
    stored = conn.execute(
        sa.select(system_values.c.value).where(system_values.c.name == "secret_key")
    ).scalar()
    if stored is None:
        stored = random.token_urlsafe(48)
        conn.execute(sa.insert(system_values).values(name="secret_key", value=stored))
    return derive_key(str(stored).encode())


def _rewrite(seal: bool) -> None:
    conn = op.get_bind()
    hooks = conn.execute(
        sa.select(webhooks.c.id, webhooks.c.secret, webhooks.c.previous_secret)
    ).all()
    found = conn.execute(sa.select(routes.c.id, routes.c.secret)).all()
    if not hooks and not found:
        return
    key = _key(conn)

    def convert(value: str | None) -> str | None:
        if value is None:
            return None
        if seal:
            return value if is_sealed(value) else seal_with(key, value)
        return unseal_with(key, value)

    for h in hooks:
        conn.execute(
            sa.update(webhooks)
            .where(webhooks.c.id == h.id)
            .values(secret=convert(h.secret), previous_secret=convert(h.previous_secret))
        )
    for r in found:
        conn.execute(sa.update(routes).where(routes.c.id == r.id).values(secret=convert(r.secret)))


def upgrade() -> None:
    _rewrite(seal=True)


def downgrade() -> None:
    _rewrite(seal=False)
