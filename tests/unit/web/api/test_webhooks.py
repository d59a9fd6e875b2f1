"""/api/v1/webhooks over HTTP: CRUD, rotation, the delivery log, replays, JSON errors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import utcnow, webhook_attempts, webhook_requests
from postbode.testing.factories import make_app
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        app = make_app(store)
        c.headers["Authorization"] = f"Bearer {app.api_key}"
        c.app_id = app.app_id  # type: ignore[attr-defined]
        yield c


def test_crud(client: TestClient) -> None:
    created = client.post(
        "/api/v1/webhooks",
        json={"url": "https://hooks.test/in", "event_types": ["delivery.bounced"]},
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and hook["format"] == "native"
    path = f"/api/v1/webhooks/{hook['id']}"
    shown = client.get(path).json()
    assert "secret" not in shown and shown["event_types"] == ["delivery.bounced"]
    assert [h["id"] for h in client.get("/api/v1/webhooks").json()["data"]] == [hook["id"]]
    changed = client.patch(path, json={"enabled": False, "event_types": []}).json()
    assert changed["enabled"] is False and changed["event_types"] == []
    assert client.patch(path, json={"url": "https://new.test/"}).json()["enabled"] is False
    assert client.delete(path).status_code == 204
    assert client.get(path).status_code == 404
    assert client.get(path).json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://hooks.test/"}, "url"),
        ({"url": "https://hooks.test/", "event_types": ["delivery.exploded"]}, "event_types.0"),
        ({"url": "https://hooks.test/", "format": "zapier"}, "format"),
        ({"url": "https://hooks.test/", "surprise": 1}, "surprise"),
        ({}, "url"),
    ],
)
def test_validation_errors_name_the_field(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/api/v1/webhooks", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_needs_an_api_key(client: TestClient) -> None:
    del client.headers["Authorization"]
    assert client.get("/api/v1/webhooks").status_code == 401
    assert client.post("/api/v1/webhooks", json={"url": "https://a.test/"}).status_code == 401


def test_rotate_secret(client: TestClient) -> None:
    hook = client.post("/api/v1/webhooks", json={"url": "https://hooks.test/in"}).json()
    rotated = client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"] != hook["secret"]
    shown = client.get(f"/api/v1/webhooks/{hook['id']}").json()
    assert shown["previous_secret_expires_at"] == rotated.json()["previous_secret_expires_at"]


def test_delivery_log_and_replay(client: TestClient, store: Store) -> None:
    hook = client.post("/api/v1/webhooks", json={"url": "https://hooks.test/in"}).json()
    event = Event(app_id=client.app_id, type=EventType.APP_ALERT, data={"alert": "x"})  # type: ignore[attr-defined]
    with store.write() as conn:
        record(conn, event)
        request_id = conn.execute(select(webhook_requests.c.id)).scalar_one()
        started = utcnow() - timedelta(seconds=5)
        conn.execute(
            insert(webhook_attempts),
            [
                {
                    "request_id": request_id,
                    "started_at": started,
                    "duration_ms": 12,
                    "status_code": 500,
                    "response_body": "oops",
                },
                {
                    "request_id": request_id,
                    "started_at": started + timedelta(seconds=1),
                    "duration_ms": 7,
                    "status_code": 200,
                    "response_body": "ok",
                },
            ],
        )
        conn.execute(
            update(webhook_requests).values(
                status="delivered", attempts=2, last_status_code=200, delivered_at=utcnow()
            )
        )
    log = client.get(f"/api/v1/webhooks/{hook['id']}/requests").json()
    (entry,) = log["data"]
    assert entry["event_id"] == str(event.id) and entry["event_type"] == "app.alert"
    assert entry["status"] == "delivered" and entry["next_attempt_at"] is None
    assert [
        (a["status_code"], a["duration_ms"], a["response_body"]) for a in entry["attempt_log"]
    ] == [
        (500, 12, "oops"),
        (200, 7, "ok"),
    ]
    replayed = client.post(
        f"/api/v1/webhooks/{hook['id']}/replay", json={"event_id": str(event.id)}
    )
    assert replayed.status_code == 202 and replayed.json()["status"] == "pending"
    log = client.get(f"/api/v1/webhooks/{hook['id']}/requests", params={"limit": 1}).json()
    assert log["data"][0]["id"] == replayed.json()["id"] and log["next_cursor"]
    older = client.get(
        f"/api/v1/webhooks/{hook['id']}/requests", params={"cursor": log["next_cursor"]}
    ).json()
    assert [r["id"] for r in older["data"]] == [entry["id"]] and older["next_cursor"] is None
    pending = client.get(f"/api/v1/webhooks/{hook['id']}/requests", params={"status": "pending"})
    assert [r["id"] for r in pending.json()["data"]] == [replayed.json()["id"]]
    missing = client.post(
        f"/api/v1/webhooks/{hook['id']}/replay",
        json={"event_id": "01905d2e-0000-7000-8000-000000000000"},
    )
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "event_id"


def test_openapi_lists_the_endpoints(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/v1/webhooks", "/api/v1/webhooks/{webhook_id}/replay", "/api/v1/events"} <= set(
        paths
    )
    assert not any(p.startswith("/t/") for p in paths)
