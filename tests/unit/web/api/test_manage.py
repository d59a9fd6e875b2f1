"""The management API: organisation tokens only (app keys never manage), apps, credentials,
domains with DKIM rotation, webhooks, users and roles, tokens, and an audit row per change."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient asks for httpx2
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        yield c


@pytest.fixture
def token(store: Store) -> str:
    return str(tenancy.create_org_token(store, "acme", "ci")["token"])


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def actions(client: TestClient, token: str) -> list[str]:
    entries = client.get("/api/v1/audit", headers=auth(token)).json()["data"]
    return [e["action"] for e in reversed(entries)]


def test_only_an_organisation_token_manages(client: TestClient, store: Store, token: str) -> None:
    assert client.get("/api/v1/apps").status_code == 401
    assert client.get("/api/v1/apps", headers=auth("pbo_0_nope")).status_code == 401
    app = tenancy.create_app(store, "shop", "acme")
    refused = client.get("/api/v1/apps", headers=auth(app.api_key))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert client.get("/api/v1/apps", headers=auth(token)).status_code == 200
    # stored hashed: the secret part is nowhere in the store
    listed = client.get("/api/v1/tokens", headers=auth(token)).json()["data"]
    assert [t["name"] for t in listed] == ["ci"]
    assert token.split("_", 2)[2] not in str(listed)
    # revocable: a token may revoke itself, and then it stops working
    assert (
        client.delete(f"/api/v1/tokens/{listed[0]['id']}", headers=auth(token)).status_code == 204
    )
    assert client.get("/api/v1/apps", headers=auth(token)).status_code == 401


def test_apps_and_credentials(client: TestClient, store: Store, token: str) -> None:
    h = auth(token)
    created = client.post("/api/v1/apps", json={"name": "shop"}, headers=h)
    assert created.status_code == 201, created.text
    secrets = created.json()
    assert set(secrets) == {"app", "api_key", "smtp_username", "smtp_password"}
    assert tenancy.authenticate_api_key(store, secrets["api_key"]) is not None
    assert client.post("/api/v1/apps", json={"name": "shop"}, headers=h).status_code == 409
    assert [a["name"] for a in client.get("/api/v1/apps", headers=h).json()["data"]] == ["shop"]

    changed = client.patch(
        "/api/v1/apps/shop", json={"track_opens": True, "raw_retention_days": 7}, headers=h
    )
    assert changed.status_code == 200
    assert (changed.json()["track_opens"], changed.json()["raw_retention_days"]) == (True, 7)
    bad = client.patch("/api/v1/apps/shop", json={"raw_retention_days": -1}, headers=h)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "raw_retention_days"
    for field in ("track_clicks", "raw_retention_days", "status"):  # null is no value for these
        bad = client.patch("/api/v1/apps/shop", json={field: None}, headers=h)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == field, bad.text
    unset = client.patch("/api/v1/apps/shop", json={"max_message_age_seconds": None}, headers=h)
    assert unset.status_code == 200 and unset.json()["max_message_age_seconds"] is None
    assert client.post("/api/v1/apps/shop/suspend", headers=h).json()["status"] == "suspended"
    assert client.post("/api/v1/apps/shop/resume", headers=h).json()["status"] == "active"

    key = client.post(
        "/api/v1/apps/shop/credentials", json={"kind": "api", "name": "worker"}, headers=h
    ).json()
    assert key["api_key"].startswith("pb_")
    smtp = client.post("/api/v1/apps/shop/credentials", json={"kind": "smtp"}, headers=h).json()
    assert smtp["smtp_password"]
    listed = client.get("/api/v1/apps/shop/credentials", headers=h).json()["data"]
    assert len(listed) == 4 and all("secret" not in str(c) for c in listed)
    assert key["api_key"] not in str(listed)
    gone = client.delete(f"/api/v1/apps/shop/credentials/{key['id']}", headers=h)
    assert gone.status_code == 204
    assert tenancy.authenticate_api_key(store, key["api_key"]) is None
    assert actions(client, token) == [
        "app.create",
        "app.settings",
        "app.suspend",
        "app.resume",
        "credential.create",
        "credential.create",
        "credential.revoke",
    ]


def test_another_organizations_app_is_not_there(
    client: TestClient, store: Store, token: str
) -> None:
    tenancy.create_app(store, "theirs", "other-org")
    h = auth(token)
    assert client.get("/api/v1/apps", headers=h).json()["data"] == []
    for method, path in [
        ("get", "/api/v1/apps/theirs"),
        ("patch", "/api/v1/apps/theirs"),
        ("get", "/api/v1/apps/theirs/credentials"),
        ("post", "/api/v1/apps/theirs/suspend"),
        ("get", "/api/v1/apps/theirs/webhooks"),
    ]:
        kwargs: dict[str, Any] = {"json": {}} if method == "patch" else {}
        assert getattr(client, method)(path, headers=h, **kwargs).status_code == 404, path


def test_domains_and_dkim_rotation(client: TestClient, store: Store, token: str) -> None:
    h = auth(token)
    client.post("/api/v1/apps", json={"name": "shop"}, headers=h)
    added = client.post("/api/v1/apps/shop/domains", json={"name": "Shop.Test"}, headers=h)
    assert added.status_code == 201, added.text
    domain = added.json()
    assert domain["name"] == "shop.test"
    assert [r["purpose"] for r in domain["records"]] == [
        "spf",
        "dkim",
        "return_path",
        "return_path_mx",
        "dmarc",
    ]
    old = domain["dkim_selector"]
    rotated = client.post(
        "/api/v1/apps/shop/domains/shop.test/rotate-dkim", json={"grace_days": 3}, headers=h
    ).json()
    assert rotated["dkim_selector"] != old and rotated["previous_dkim_selector"] == old
    dkim = {r["purpose"]: r for r in rotated["records"] if r["purpose"].startswith("dkim")}
    assert dkim["dkim"]["name"] == f"{rotated['dkim_selector']}._domainkey.shop.test"
    assert dkim["dkim_previous"]["name"] == f"{old}._domainkey.shop.test"
    assert dkim["dkim"]["value"] != dkim["dkim_previous"]["value"]
    # Rotating with no grace retires the previous key at once.
    again = client.post(
        "/api/v1/apps/shop/domains/shop.test/rotate-dkim", json={"grace_days": 0}, headers=h
    ).json()
    assert [r["purpose"] for r in again["records"]].count("dkim_previous") == 0
    assert client.get("/api/v1/domains", headers=h).json()["data"][0]["app"] == "shop"
    assert client.get("/api/v1/apps/shop/domains/nope.test", headers=h).status_code == 404
    assert actions(client, token)[-3:] == ["domain.add", "domain.dkim_rotate", "domain.dkim_rotate"]


def test_webhooks_users_and_roles(client: TestClient, store: Store, token: str) -> None:
    h = auth(token)
    client.post("/api/v1/apps", json={"name": "shop"}, headers=h)
    hook = client.post(
        "/api/v1/apps/shop/webhooks",
        json={"url": "https://app.test/hooks", "format": "sendgrid"},
        headers=h,
    ).json()
    assert hook["secret"].startswith("whsec_") and hook["verification_key"]
    path = f"/api/v1/apps/shop/webhooks/{hook['id']}"
    assert client.patch(path, json={"enabled": False}, headers=h).json()["enabled"] is False
    rotated = client.post(path + "/rotate-secret", headers=h).json()
    assert rotated["verification_key"] != hook["verification_key"]
    assert client.delete(path, headers=h).status_code == 204

    made = client.post(
        "/api/v1/users", json={"email": "Ann@Acme.test", "role": "owner"}, headers=h
    ).json()
    assert made["email"] == "ann@acme.test" and len(made["password"]) >= 8
    assert tenancy.verify_user(store, "ann@acme.test", made["password"]) == made["id"]
    bob = client.post(
        "/api/v1/users",
        json={"email": "bob@acme.test", "password": "long enough pw"},
        headers=h,
    ).json()
    assert bob["password"] is None
    promoted = client.patch(f"/api/v1/users/{bob['id']}", json={"role": "admin"}, headers=h)
    assert promoted.json() == {"id": bob["id"], "role": "admin", "previous_role": "viewer"}
    last_owner = client.patch(f"/api/v1/users/{made['id']}", json={"role": "viewer"}, headers=h)
    assert last_owner.status_code == 422
    assert client.delete(f"/api/v1/users/{bob['id']}", headers=h).status_code == 204
    assert [u["email"] for u in client.get("/api/v1/users", headers=h).json()["data"]] == [
        "ann@acme.test"
    ]
    assert actions(client, token)[1:] == [
        "webhook.create",
        "webhook.update",
        "webhook.rotate_secret",
        "webhook.delete",
        "user.create",
        "user.create",
        "user.role",
        "user.remove",
    ]


def test_a_stranger_is_refused_before_the_body_is_read(client: TestClient, token: str) -> None:
    big = b'{"name": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    headers = {"content-type": "application/json"}
    assert client.post("/api/v1/apps", content=big, headers=headers).status_code == 401
    with_token = client.post("/api/v1/apps", content=big, headers={**headers, **auth(token)})
    assert with_token.status_code == 413
