"""GET /api/v1/stats and /api/v1/stats/compare: the caller's counters only, errors naming the
parameter."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType as T
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.testing.factories import make_app
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        yield c


def test_stats_series_and_summary(client: TestClient, store: Store) -> None:
    app, other = make_app(store), make_app(store)
    now = utcnow()
    with store.write() as conn:
        record(
            conn,
            [
                Event(app_id=app.app_id, type=T.DELIVERY_QUEUED, tag="welcome", at=now),
                Event(app_id=app.app_id, type=T.DELIVERY_DELIVERED, tag="welcome", at=now),
                Event(app_id=app.app_id, type=T.MESSAGE_OPENED, tag="welcome", at=now, bot=True),
                Event(app_id=app.app_id, type=T.DELIVERY_QUEUED, tag="reset", at=now),
                Event(app_id=app.app_id, type=T.DELIVERY_BOUNCED, tag="reset", at=now),
                Event(app_id=other.app_id, type=T.DELIVERY_DELIVERED, at=now),
                Event(
                    app_id=app.app_id,
                    type=T.DELIVERY_DELIVERED,
                    at=now - timedelta(days=3),
                ),
            ],
        )
    auth = {"Authorization": f"Bearer {app.api_key}"}

    def get(path: str = "/api/v1/stats", **params: Any) -> Any:
        response = client.get(path, params=params, headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    day = get()  # 24h by default
    assert day["series"]["bucket_seconds"] == 900 and len(day["series"]["buckets"]) == 96
    assert sum(day["series"]["counts"]["delivery.delivered"]) == 1  # not the other app's
    assert day["series"]["counts"]["delivery.delivered"][-1] == 1  # now: the last bucket
    assert sum(day["series"]["bots"]["message.opened"]) == 1
    summary = day["summary"]
    assert summary["sent"] == 2 and summary["totals"]["delivery.bounced"] == 1
    assert summary["human"]["message.opened"] == 0
    assert summary["rates"]["delivery_rate"] == 0.5 and summary["rates"]["open_rate"] == 0
    assert day["series"]["buckets"][0].endswith("Z") or "+00:00" in day["series"]["buckets"][0]

    week = get(range="7d", types="delivery.delivered,delivery.bounced")
    assert set(week["series"]["counts"]) == {"delivery.delivered", "delivery.bounced"}
    assert sum(week["series"]["counts"]["delivery.delivered"]) == 2
    assert week["summary"]["totals"]["delivery.queued"] == 2  # the summary is complete
    repeated = get(range="7d", types=["delivery.delivered", "delivery.bounced"])
    assert repeated["series"] == week["series"]

    assert get(tag="welcome")["summary"]["sent"] == 1
    assert get(tag="")["summary"]["sent"] == 2  # empty: every tag
    assert get(stream="broadcast")["summary"]["totals"] == {}
    custom = get(
        since=(now - timedelta(days=4)).isoformat(), until=(now + timedelta(minutes=1)).isoformat()
    )
    assert custom["summary"]["totals"]["delivery.delivered"] == 2
    assert custom["series"]["bucket_seconds"] == 3600


def test_stats_errors_name_the_parameter(client: TestClient, store: Store) -> None:
    app = make_app(store)
    auth = {"Authorization": f"Bearer {app.api_key}"}

    def error(path: str = "/api/v1/stats", **params: Any) -> tuple[int, Any]:
        response = client.get(path, params=params, headers=auth)
        return response.status_code, response.json()["error"]

    assert client.get("/api/v1/stats").status_code == 401
    status, body = error(range="2w")
    assert status == 422 and body["field"] == "range"
    status, body = error(types="delivery.nope")
    assert status == 422 and body["field"] == "types" and "delivery.nope" in body["message"]
    status, body = error(range="24h", since="2026-01-01T00:00:00Z")
    assert status == 422 and body["field"] == "range"
    status, body = error(until="2026-01-01T00:00:00Z")
    assert status == 422 and body["field"] == "since"
    status, body = error(since="2026-01-02T00:00:00Z", until="2026-01-01T00:00:00Z")
    assert status == 422 and body["field"] == "until"
    status, body = error("/api/v1/stats/compare", a="x")
    assert status == 422 and body["field"] == "b"


def test_compare_two_tags(client: TestClient, store: Store) -> None:
    app = make_app(store)
    now = utcnow()
    batch = []
    for tag, opens in (("a", 60), ("b", 20)):
        for kind, n in ((T.DELIVERY_DELIVERED, 200), (T.MESSAGE_OPENED, opens)):
            batch += [Event(app_id=app.app_id, type=kind, tag=tag, at=now) for _ in range(n)]
    with store.write() as conn:
        record(conn, batch)
    response = client.get(
        "/api/v1/stats/compare",
        params={"a": "a", "b": "b", "range": "1h"},
        headers={"Authorization": f"Bearer {app.api_key}"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["a"]["tag"] == "a" and body["a"]["totals"]["delivery.delivered"] == 200
    opens = next(t for t in body["tests"] if t["metric"] == "open_rate")
    assert opens["a_rate"] == 0.3 and opens["b_rate"] == 0.1
    assert opens["significant"] is True and opens["p_value"] < 0.001
    assert "A is higher by 20.0 points" in opens["note"]
