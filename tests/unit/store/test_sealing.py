"""Signing secrets at rest: sealed with a key derived from the installation secret, opened
again to sign; the migration seals the rows an older release kept in clear."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select

from postbode.endpoints.signing import generate_secret
from postbode.store.engine import Store
from postbode.store.migrate import downgrade, migrate
from postbode.store.schema import routes, utcnow, webhooks
from postbode.store.sealing import (
    SealError,
    derive_key,
    is_sealed,
    key_for,
    seal_with,
    unseal,
    unseal_with,
)
from postbode.testing.factories import make_app
from postbode.webhooks import manage


def test_a_sealed_secret_opens_only_with_its_installation_key() -> None:
    key, other = derive_key(b"installation one"), derive_key(b"installation two")
    secret = generate_secret()
    sealed = seal_with(key, secret)
    assert is_sealed(sealed) and secret not in sealed
    assert len(sealed) <= 100  # the columns' width
    assert seal_with(key, secret) != sealed  # a fresh nonce each time
    assert unseal_with(key, sealed) == secret
    assert unseal_with(key, secret) == secret  # a row not sealed yet reads as it is
    with pytest.raises(SealError):
        unseal_with(other, sealed)


def test_new_webhooks_are_stored_sealed(store: Store) -> None:
    app = make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    with store.read() as conn:
        stored = conn.execute(select(webhooks.c.secret)).scalar_one()
    assert stored != hook["secret"] and is_sealed(stored)
    assert unseal(store, stored) == hook["secret"]


def test_the_migration_seals_secrets_kept_in_clear(store: Store) -> None:
    app = make_app(store)
    hook_secret, old_secret, route_secret = generate_secret(), generate_secret(), generate_secret()
    downgrade(store, "0008")
    try:
        with store.write() as conn:
            conn.execute(
                insert(webhooks).values(
                    app_id=app.app_id,
                    url="https://hooks.test/in",
                    format="native",
                    event_types=[],
                    enabled=True,
                    secret=hook_secret,
                    previous_secret=old_secret,
                    created_at=utcnow(),
                )
            )
            conn.execute(
                insert(routes).values(
                    app_id=app.app_id,
                    pattern="support@in.test",
                    action="hold",
                    format="native",
                    secret=route_secret,
                    enabled=True,
                    created_at=utcnow(),
                )
            )
    finally:
        migrate(store)
    with store.read() as conn:
        hook = conn.execute(select(webhooks.c.secret, webhooks.c.previous_secret)).one()
        route = conn.execute(select(routes.c.secret)).scalar_one()
    assert all(is_sealed(v) for v in (hook.secret, hook.previous_secret, route))
    key = key_for(store)
    assert unseal_with(key, hook.secret) == hook_secret
    assert unseal_with(key, hook.previous_secret) == old_secret
    assert unseal_with(key, route) == route_secret
