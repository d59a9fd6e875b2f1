"""GET /api/v1/events: the caller's events only, filtered, paged by event id."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import timedelta

import pytest

from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.testing.factories import make_app, make_queued_message
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        yield c


def test_list_filter_and_page(client: TestClient, store: Store) -> None:
    app, other = make_app(store), make_app(store)
    message_id, (alice, bob) = make_queued_message(
        store, app.app_id, ["alice@dest.test", "Bob@dest.test"]
    )
    start = utcnow() - timedelta(minutes=10)
    mine = [
        Event(
            app_id=app.app_id,
            type=EventType.DELIVERY_DEFERRED if i % 2 else EventType.DELIVERY_DELIVERED,
            message_id=message_id,
            delivery_id=alice if i < 3 else bob,
            recipient="alice@dest.test" if i < 3 else "Bob@dest.test",
            at=start + timedelta(minutes=i),
            data={"i": i},
        )
        for i in range(6)
    ]
    with store.write() as conn:
        record(conn, mine)
        record(conn, Event(app_id=other.app_id, type=EventType.DELIVERY_DELIVERED))
    auth = {"Authorization": f"Bearer {app.api_key}"}

    def get(**params: object) -> dict:
        response = client.get("/api/v1/events", params=params, headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    everything = get()
    assert [e["data"]["i"] for e in everything["data"]] == [5, 4, 3, 2, 1, 0]  # newest first
    assert everything["next_cursor"] is None
    first = everything["data"][0]
    assert first["type"] == "delivery.deferred" and first["message_id"] == str(message_id)
    assert first["delivery_id"] == str(bob) and first["created_at"].endswith("Z")

    assert [e["data"]["i"] for e in get(type="delivery.deferred")["data"]] == [5, 3, 1]
    both = get(type=["delivery.deferred", "delivery.delivered"], limit=100)
    assert len(both["data"]) == 6
    assert [e["data"]["i"] for e in get(recipient="bob@DEST.test")["data"]] == [5, 4, 3]
    assert len(get(message_id=str(message_id))["data"]) == 6
    window = get(
        since=(start + timedelta(minutes=2)).isoformat(),
        until=(start + timedelta(minutes=4)).isoformat(),
    )
    assert [e["data"]["i"] for e in window["data"]] == [3, 2]

    seen, cursor = [], None
    while True:
        page = get(limit=4, **({"cursor": cursor} if cursor else {}))
        seen += [e["data"]["i"] for e in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == [5, 4, 3, 2, 1, 0]
    forward, cursor = [], None
    while True:
        page = get(limit=4, order="asc", **({"cursor": cursor} if cursor else {}))
        forward += [e["data"]["i"] for e in page["data"]]
        if not (cursor := page["next_cursor"]):
            break
    assert forward == [0, 1, 2, 3, 4, 5]


def test_errors(client: TestClient, store: Store) -> None:
    app = make_app(store)
    assert client.get("/api/v1/events").status_code == 401
    auth = {"Authorization": f"Bearer {app.api_key}"}
    bad = client.get("/api/v1/events", params={"type": "delivery.exploded"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "type.0"
    assert client.get("/api/v1/events", params={"limit": 0}, headers=auth).status_code == 422
    assert client.get("/api/v1/events", params={"cursor": "x"}, headers=auth).status_code == 422
