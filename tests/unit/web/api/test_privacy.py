"""The privacy API: an API key erases and exports one person's data in its own app only;
both are audited under the address's hash; bad input is a JSON error naming the field."""

from __future__ import annotations

import warnings

from sqlalchemy import select

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import audit_log, deliveries
from postbode.testing.factories import make_app, make_queued_message
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_erase_and_export_through_the_api(store: Store, settings: Settings) -> None:
    shop, news = make_app(store, "shop"), make_app(store, "news")
    mine, _ = make_queued_message(store, shop.app_id, ["ann@x.test"])
    make_queued_message(store, news.app_id, ["ann@x.test"])
    with store.write() as conn:  # ended, so the erasure does not cancel anything
        conn.execute(deliveries.update().values(status="delivered"))
    with TestClient(create_app(settings, store)) as client:
        client.headers["Authorization"] = f"Bearer {shop.api_key}"
        exported = client.get("/api/v1/privacy/exports/Ann@x.test")
        assert exported.status_code == 200 and exported.headers["cache-control"] == "no-store"
        doc = exported.json()
        assert doc["apps"] == ["shop"] and [m["id"] for m in doc["messages"]] == [str(mine)]
        dry = client.post("/api/v1/privacy/erasures", json={"email": "ann@x.test", "dry_run": True})
        assert dry.status_code == 200 and dry.json()["counts"]["deliveries"] == 1
        done = client.post("/api/v1/privacy/erasures", json={"email": "ann@x.test"})
        assert done.status_code == 200, done.text
        assert done.json()["complete"] and done.json()["apps"] == ["shop"]
        bad = client.post("/api/v1/privacy/erasures", json={"email": "nobody"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "email"
        unknown = client.post("/api/v1/privacy/erasures", json={"email": "a@x.test", "x": 1})
        assert unknown.status_code == 422
        client.headers["Authorization"] = "Bearer pb_wrong"
        assert client.get("/api/v1/privacy/exports/ann@x.test").status_code == 401
    with store.read() as conn:
        left = sorted(conn.execute(select(deliveries.c.app_id, deliveries.c.recipient)).all())
        audited = conn.execute(
            select(audit_log.c.actor, audit_log.c.action, audit_log.c.target).order_by(
                audit_log.c.id
            )
        ).all()
    # the other app's delivery is its own: untouched
    assert left[1] == (news.app_id, "ann@x.test") and left[0][1].startswith("hmac:")
    assert [(a.actor, a.action) for a in audited] == [
        ("api:shop", "privacy.export"),
        ("api:shop", "privacy.erase"),
    ]
    assert all(a.target == left[0][1] for a in audited)
