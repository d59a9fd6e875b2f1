"""The management API holds and releases an app and lists its alerts; mail sent to a held app
is accepted as `held` with the reason; both changes are in the audit log with who made them."""

from __future__ import annotations

import warnings

from postbode import tenancy
from postbode.abuse import alerts
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient asks for httpx2
    from fastapi.testclient import TestClient

MAIL = {"from": "orders@shop.test", "to": ["alice@dest.test"], "subject": "Hi", "text": "Hello"}


def test_hold_release_and_alerts(settings: Settings, store: Store) -> None:
    shop = tenancy.create_app(store, "shop", "acme")
    tenancy.add_domain(store, "shop", "shop.test")
    token = str(tenancy.create_org_token(store, "acme", "ops")["token"])
    org = {"Authorization": f"Bearer {token}"}
    key = {"Authorization": f"Bearer {shop.api_key}"}
    acceptor = Acceptor(store, settings.smtp_hostname, allow_unverified=True)
    with TestClient(create_app(settings, store, acceptor)) as client:
        try:
            bad = client.post("/api/v1/apps/shop/hold", json={"reason": " "}, headers=org)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "reason"
            missing = client.post("/api/v1/apps/shop/hold", json={}, headers=org)
            assert missing.status_code == 422 and missing.json()["error"]["field"] == "reason"
            by_key = client.post("/api/v1/apps/shop/hold", json={"reason": "x"}, headers=key)
            assert by_key.status_code == 403  # an app's own key cannot lift or set a hold
            held = client.post(
                "/api/v1/apps/shop/hold", json={"reason": "too many bounces"}, headers=org
            )
            assert held.status_code == 200, held.text
            assert held.json()["hold_reason"] == "too many bounces"
            actor = held.json()["held_by"]
            assert actor.startswith("token:") and "ops" in actor

            sent = client.post("/api/v1/messages", json=MAIL, headers=key)
            assert sent.status_code == 202, sent.text
            assert [r["status"] for r in sent.json()["recipients"]] == ["held"]
            listed = client.get("/api/v1/apps", headers=org).json()["data"]
            assert listed[0]["hold_reason"] == "too many bounces"

            alerts.raise_alert(store, shop.app_id, "bounce_rate", {"rate": 0.15}, held=True)
            shown = client.get("/api/v1/alerts", headers=org).json()["data"]
            assert [(a["app"], a["kind"], a["held"]) for a in shown] == [
                ("shop", "bounce_rate", True)
            ]
            assert shown[0]["figures"] == {"rate": 0.15}
            assert client.get("/api/v1/alerts?app=nope", headers=org).status_code == 404

            released = client.post("/api/v1/apps/shop/release", headers=org)
            assert released.status_code == 200, released.text
            assert released.json()["released"] == 1 and released.json()["hold_reason"] is None
            again = client.post("/api/v1/messages", json=MAIL, headers=key).json()
            assert [r["status"] for r in again["recipients"]] == ["queued"]

            entries = client.get("/api/v1/audit", headers=org).json()["data"]
            mine = [(e["actor"], e["action"]) for e in reversed(entries)]
            assert (actor, "app.hold") in mine and (actor, "app.release") in mine
        finally:
            assert client.portal is not None
            client.portal.call(acceptor.close)


def test_limits_of_an_app_and_a_credential(settings: Settings, store: Store) -> None:
    tenancy.create_app(store, "shop", "acme")
    token = str(tenancy.create_org_token(store, "acme", "ops")["token"])
    org = {"Authorization": f"Bearer {token}"}
    cred_id = tenancy.list_credentials(store, "shop")[0]["id"]
    with TestClient(create_app(settings, store)) as client:
        none = client.get("/api/v1/apps/shop/limits", headers=org).json()
        assert none == {
            "app": "shop",
            "credential_id": None,
            "per_minute": None,
            "per_hour": None,
            "per_day": None,
        }
        set_ = client.patch("/api/v1/apps/shop/limits", json={"per_minute": 100}, headers=org)
        assert set_.status_code == 200 and set_.json()["per_minute"] == 100
        more = client.patch("/api/v1/apps/shop/limits", json={"per_day": 5000}, headers=org)
        assert (more.json()["per_minute"], more.json()["per_day"]) == (100, 5000)
        off = client.patch("/api/v1/apps/shop/limits", json={"per_minute": 0}, headers=org)
        assert off.json()["per_minute"] is None
        bad = client.patch("/api/v1/apps/shop/limits", json={"per_hour": -5}, headers=org)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "per_hour"
        extra = client.patch("/api/v1/apps/shop/limits", json={"per_week": 5}, headers=org)
        assert extra.status_code == 422
        path = f"/api/v1/apps/shop/credentials/{cred_id}/limits"
        cred = client.patch(path, json={"per_hour": 10}, headers=org)
        assert cred.status_code == 200 and cred.json()["credential_id"] == cred_id
        assert client.get(path, headers=org).json()["per_hour"] == 10
        missing = client.get(f"/api/v1/apps/shop/credentials/{cred_id + 99}/limits", headers=org)
        assert missing.status_code == 404
        entries = client.get("/api/v1/audit", headers=org).json()["data"]
        assert sum(e["action"] == "app.limits" for e in entries) == 4


def test_what_the_detectors_see(settings: Settings, store: Store) -> None:
    tenancy.create_app(store, "shop", "acme")
    token = str(tenancy.create_org_token(store, "acme", "ops")["token"])
    with TestClient(create_app(settings, store)) as client:
        got = client.get("/api/v1/apps/shop/abuse", headers={"Authorization": f"Bearer {token}"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["app"] == "shop" and body["hold_reason"] is None
    assert (body["per_minute"], body["baseline_per_minute"]) == (0.0, None)
    assert (body["bounce_threshold"], body["complaint_threshold"]) == (0.10, 0.003)
