"""Apps, credentials, domains and users."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import credentials, domains, memberships


def test_create_app_keeps_only_hashes(store: Store) -> None:
    created = tenancy.create_app(store, "shop")
    with store.read() as conn:
        rows = conn.execute(select(credentials)).mappings().all()
    assert {r["kind"] for r in rows} == {"api", "smtp"}
    for row in rows:
        assert created.api_key not in row["secret_hash"]
        assert created.smtp_password not in row["secret_hash"]
        assert created.api_key.split("_", 2)[2] not in str(dict(row))
    smtp = next(r for r in rows if r["kind"] == "smtp")
    assert smtp["secret_hash"].startswith("$argon2")


def test_api_key_authenticates_and_revocation_stops_it(store: Store) -> None:
    created = tenancy.create_app(store, "shop")
    other = tenancy.create_app(store, "blog")
    assert tenancy.authenticate_api_key(store, created.api_key) == created.app_id
    assert tenancy.authenticate_api_key(store, other.api_key) == other.app_id
    assert tenancy.authenticate_api_key(store, created.api_key + "x") is None
    assert tenancy.authenticate_api_key(store, "pb_nonsense") is None
    assert tenancy.authenticate_api_key(store, "") is None
    (cred,) = [c for c in tenancy.list_credentials(store, "shop") if c["kind"] == "api"]
    tenancy.revoke_credential(store, cred["id"])
    assert tenancy.authenticate_api_key(store, created.api_key) is None
    with pytest.raises(tenancy.TenancyError):
        tenancy.revoke_credential(store, cred["id"])


def test_smtp_login(store: Store) -> None:
    created = tenancy.create_app(store, "shop")
    assert tenancy.authenticate_smtp(store, created.smtp_username, created.smtp_password) == (
        created.app_id
    )
    # a second time comes from the verified cache and must still be right
    assert tenancy.authenticate_smtp(store, created.smtp_username, created.smtp_password) == (
        created.app_id
    )
    assert tenancy.authenticate_smtp(store, created.smtp_username, "wrong") is None
    assert tenancy.authenticate_smtp(store, "nobody", created.smtp_password) is None
    (cred,) = [c for c in tenancy.list_credentials(store, "shop") if c["kind"] == "smtp"]
    tenancy.revoke_credential(store, cred["id"])
    assert tenancy.authenticate_smtp(store, created.smtp_username, created.smtp_password) is None


def test_new_credentials(store: Store) -> None:
    tenancy.create_app(store, "shop")
    api = tenancy.create_credential(store, "shop", "api", "ci")
    smtp = tenancy.create_credential(store, "shop", "smtp", "cms")
    assert tenancy.authenticate_api_key(store, api["api_key"]) is not None
    assert tenancy.authenticate_smtp(store, smtp["smtp_username"], smtp["smtp_password"])
    with pytest.raises(tenancy.TenancyError, match="unknown credential kind"):
        tenancy.create_credential(store, "shop", "ftp")
    with pytest.raises(tenancy.TenancyError, match="no app named"):
        tenancy.create_credential(store, "nope", "api")


@pytest.mark.parametrize("name", ["", "Shop", "a b", "x" * 101, "über"])
def test_bad_app_names_are_refused(sqlite_store: Store, name: str) -> None:
    with pytest.raises(tenancy.TenancyError, match="invalid app name"):
        tenancy.create_app(sqlite_store, name)


def test_domain_gets_a_2048_bit_dkim_key_and_records(store: Store) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    tenancy.create_app(store, "shop")
    row = tenancy.add_domain(store, "shop", "Shop.Test.")
    assert row["name"] == "shop.test"
    key = load_pem_private_key(row["dkim_private_key"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    records = {r["purpose"]: r for r in tenancy.dns_records(row, "mx.postbode.test", "rp.test")}
    assert records["dkim"]["name"] == f"{row['dkim_selector']}._domainkey.shop.test"
    assert records["dkim"]["value"].startswith("v=DKIM1; k=rsa; p=")
    assert records["return_path"] == {
        "purpose": "return_path",
        "type": "CNAME",
        "name": "pb-bounces.shop.test",
        "value": "rp.test",
    }
    assert records["spf"]["value"].startswith("v=spf1 ")
    assert records["dmarc"]["name"] == "_dmarc.shop.test"
    with pytest.raises(tenancy.TenancyError, match="already registered"):
        tenancy.add_domain(store, "shop", "shop.test")
    with store.read() as conn:
        assert conn.execute(select(domains.c.name)).scalars().all() == ["shop.test"]


@pytest.mark.parametrize("name", ["localhost", "-a.test", "a..test", "a" * 64 + ".test"])
def test_bad_domains_are_refused(sqlite_store: Store, name: str) -> None:
    tenancy.create_app(sqlite_store, "shop")
    with pytest.raises(tenancy.TenancyError, match="invalid domain"):
        tenancy.add_domain(sqlite_store, "shop", name)


def test_users_and_roles(store: Store) -> None:
    owner = tenancy.create_user(store, "Owner@Shop.test", "correct horse", admin=True)
    viewer = tenancy.create_user(store, "v@shop.test", "battery staple", role="viewer")
    assert tenancy.verify_user(store, "owner@shop.test", "correct horse") == owner
    assert tenancy.verify_user(store, "owner@shop.test", "wrong password") is None
    assert tenancy.verify_user(store, "ghost@shop.test", "correct horse") is None
    with store.read() as conn:
        roles = dict(conn.execute(select(memberships.c.user_id, memberships.c.role)).all())
    assert roles == {owner: "owner", viewer: "viewer"}
    with pytest.raises(tenancy.TenancyError, match="too short"):
        tenancy.create_user(store, "x@shop.test", "short")
    with pytest.raises(tenancy.TenancyError, match="unknown role"):
        tenancy.create_user(store, "x@shop.test", "long enough", role="god")


def test_the_verified_claim_holds_a_name_and_only_a_sole_claim_stands_in_for_it() -> None:
    from collections import namedtuple
    from datetime import UTC, datetime

    claim = namedtuple("claim", "name app_id verified_at")
    now = datetime.now(UTC)
    claims = [
        claim("held.test", 1, None),
        claim("held.test", 2, now),
        claim("Shared.test", 3, None),
        claim("shared.test", 4, None),
        claim("alone.test", 5, None),
    ]
    strict = tenancy.holders(claims, allow_unverified=False)
    assert {n: c.app_id for n, c in strict.items()} == {"held.test": 2}
    lenient = tenancy.holders(claims, allow_unverified=True)
    assert {n: c.app_id for n, c in lenient.items()} == {"held.test": 2, "alone.test": 5}
