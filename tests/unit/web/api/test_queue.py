"""The queue management API over HTTP, on both dialects: scoping, states, errors, bulk, views."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, utcnow
from postbode.testing.factories import make_app, make_queued_message
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    web = create_app(settings, store)
    with TestClient(web) as c:
        try:
            yield c
        finally:
            assert c.portal is not None
            c.portal.call(web.state.acceptor.close)


@pytest.fixture
def app(store: Store) -> tenancy.NewApp:
    return make_app(store)


def auth(app: tenancy.NewApp) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.api_key}"}


def queued(store: Store, app: tenancy.NewApp, *recipients: str, **values: Any) -> list[str]:
    _, ids = make_queued_message(store, app.app_id, list(recipients))
    if values:
        with store.write() as conn:
            conn.execute(update(deliveries).where(deliveries.c.id.in_(ids)).values(**values))
    return [str(i) for i in ids]


def status_of(store: Store, delivery_id: str) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                select(deliveries.c.status).where(deliveries.c.id == uuid.UUID(delivery_id))
            ).scalar_one()
        )


def test_every_endpoint_needs_an_api_key(client: TestClient) -> None:
    some = uuid.uuid4()
    for method, path in [
        ("GET", "/api/v1/deliveries"),
        ("GET", "/api/v1/queue/summary"),
        ("POST", f"/api/v1/deliveries/{some}/retry"),
        ("POST", "/api/v1/deliveries/cancel"),
    ]:
        response = client.request(method, path, json={"status": "held"})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"


def test_retry_one(client: TestClient, store: Store, app: tenancy.NewApp) -> None:
    (d,) = queued(
        store,
        app,
        "a@dest.test",
        status="deferred",
        next_attempt_at=utcnow() + timedelta(hours=2),
        last_reply="451 4.7.1 Greylisted",
    )
    response = client.post(f"/api/v1/deliveries/{d}/retry", headers=auth(app))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == d and body["status"] == "queued"
    assert body["last_reply"] == "451 4.7.1 Greylisted"
    assert body["next_attempt_at"] is not None
    assert status_of(store, d) == "queued"


def test_retry_of_a_delivered_one_is_a_conflict(
    client: TestClient, store: Store, app: tenancy.NewApp
) -> None:
    (d,) = queued(store, app, "a@dest.test", status="delivered")
    response = client.post(f"/api/v1/deliveries/{d}/retry", headers=auth(app))
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "conflict" and error["field"] == "status"
    assert "delivered" in error["message"]
    assert status_of(store, d) == "delivered"


def test_cancel_and_release_one(client: TestClient, store: Store, app: tenancy.NewApp) -> None:
    a, b = queued(store, app, "a@dest.test", "b@dest.test", status="held")
    assert client.post(f"/api/v1/deliveries/{a}/cancel", headers=auth(app)).json()["status"] == (
        "cancelled"
    )
    assert client.post(f"/api/v1/deliveries/{b}/release", headers=auth(app)).json()["status"] == (
        "queued"
    )
    assert client.post(f"/api/v1/deliveries/{b}/release", headers=auth(app)).status_code == 409
    with store.read() as conn:
        types = conn.execute(select(events.c.type).order_by(events.c.id)).scalars().all()
    assert types == ["delivery.cancelled", "delivery.released"]


def test_another_apps_delivery_is_not_found(
    client: TestClient, store: Store, app: tenancy.NewApp
) -> None:
    other = make_app(store)
    (d,) = queued(store, other, "a@dest.test", status="held")
    response = client.post(f"/api/v1/deliveries/{d}/cancel", headers=auth(app))
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "not_found",
        "message": f"no delivery {d}",
        "field": "id",
    }
    assert status_of(store, d) == "held"


def test_a_malformed_id_names_the_field(client: TestClient, app: tenancy.NewApp) -> None:
    response = client.post("/api/v1/deliveries/not-a-uuid/retry", headers=auth(app))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "id"


def test_bulk(client: TestClient, store: Store, app: tenancy.NewApp) -> None:
    slow = queued(store, app, "a@slow.test", "b@slow.test", "c@slow.test", status="deferred")
    fast = queued(store, app, "d@fast.test", status="deferred")
    response = client.post(
        "/api/v1/deliveries/retry",
        json={"status": "deferred", "recipient_domain": "slow.test"},
        headers=auth(app),
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"changed": 3}
    assert [status_of(store, d) for d in [*slow, *fast]] == ["queued"] * 3 + ["deferred"]

    response = client.post(
        "/api/v1/deliveries/cancel", json={"ids": [slow[0], fast[0]]}, headers=auth(app)
    )
    assert response.json() == {"changed": 2}
    response = client.post(
        "/api/v1/deliveries/release", json={"status": ["held"]}, headers=auth(app)
    )
    assert response.json() == {"changed": 0}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("cancel", {}, None),  # nothing named: not "everything"
        ("cancel", {"recipient_domian": "slow.test"}, "recipient_domian"),  # a typo
        ("cancel", {"status": "delivered"}, "status"),
        ("release", {"status": "deferred"}, "status"),
        ("retry", {"status": "lost"}, "status.0"),
        ("retry", {"older_than_seconds": -1}, "older_than_seconds"),
        ("retry", {"ids": ["nope"]}, "ids.0"),
    ],
)
def test_bulk_refuses_filters_that_name_nothing_sensible(
    client: TestClient,
    store: Store,
    app: tenancy.NewApp,
    path: str,
    body: dict[str, Any],
    field: str | None,
) -> None:
    (d,) = queued(store, app, "a@slow.test", status="deferred")
    response = client.post(f"/api/v1/deliveries/{path}", json=body, headers=auth(app))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"]
    assert status_of(store, d) == "deferred"


def test_list_shows_why_and_when_and_pages(
    client: TestClient, store: Store, app: tenancy.NewApp
) -> None:
    reason = "waiting: rate limit for dest.test (60/min, lowered after 421 4.7.0 at 14:05 UTC)"
    ids = queued(store, app, *[f"r{i}@dest.test" for i in range(5)])
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == uuid.UUID(ids[2]))
            .values(status="deferred", last_reply=reason)
        )
    queued(store, app, "done@dest.test", status="delivered")

    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        response = client.get("/api/v1/deliveries", params=params, headers=auth(app))
        assert response.status_code == 200, response.text
        body = response.json()
        seen += body["data"]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert [d["id"] for d in seen] == ids
    assert seen[2]["status"] == "deferred" and seen[2]["last_reply"] == reason
    assert seen[2]["next_attempt_at"] and seen[2]["recipient_domain"] == "dest.test"

    response = client.get(
        "/api/v1/deliveries",
        params=[("status", "deferred"), ("status", "delivered")],
        headers=auth(app),
    )
    assert [d["status"] for d in response.json()["data"]] == ["deferred", "delivered"]
    response = client.get("/api/v1/deliveries", params={"status": "lost"}, headers=auth(app))
    assert response.status_code == 422 and response.json()["error"]["field"] == "status.0"


def test_list_is_scoped_to_the_callers_app(
    client: TestClient, store: Store, app: tenancy.NewApp
) -> None:
    queued(store, make_app(store), "theirs@dest.test")
    (mine,) = queued(store, app, "mine@dest.test")
    body = client.get("/api/v1/deliveries", headers=auth(app)).json()
    assert [d["id"] for d in body["data"]] == [mine]


def test_summary(client: TestClient, store: Store, app: tenancy.NewApp) -> None:
    queued(store, app, "a@gmail.test", "b@gmail.test", status="deferred", last_reply="421 4.7.0")
    queued(store, app, "c@corp.test", status="held", last_reply="app is suspended")
    queued(store, app, "d@corp.test")
    response = client.get("/api/v1/queue/summary", headers=auth(app))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["counts"] == {
        "scheduled": 0,
        "queued": 1,
        "deferred": 2,
        "sending": 0,
        "held": 1,
    }
    assert body["oldest_queued_seconds"] >= 0
    assert body["deferred"]["by_recipient_domain"] == [
        {"recipient_domain": "gmail.test", "count": 2}
    ]
    assert body["deferred"]["by_last_reply"] == [{"last_reply": "421 4.7.0", "count": 2}]
    assert body["held"]["by_last_reply"] == [{"last_reply": "app is suspended", "count": 1}]


def test_the_endpoints_are_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    for path in [
        "/api/v1/deliveries",
        "/api/v1/queue/summary",
        "/api/v1/deliveries/retry",
        "/api/v1/deliveries/cancel",
        "/api/v1/deliveries/release",
        "/api/v1/deliveries/{id}/retry",
        "/api/v1/deliveries/{id}/cancel",
        "/api/v1/deliveries/{id}/release",
        "/api/v1/messages/{id}/cancel",
    ]:
        assert path in paths, path
