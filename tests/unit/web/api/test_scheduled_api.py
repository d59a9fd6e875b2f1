"""send_at on POST /api/v1/messages and the batch: deliveries wait as `scheduled`, show in the
queue, are claimed only from send_at, and can be cancelled one by one or in bulk."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.store.claim import DELIVERIES, claim
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

MSG = {"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "s", "text": "t"}


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        c.headers["Authorization"] = f"Bearer {app.api_key}"
        yield c


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def test_a_scheduled_message_waits_until_send_at(client: TestClient, store: Store) -> None:
    send_at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    answer = client.post("/api/v1/messages", json={**MSG, "send_at": _iso(send_at)})
    assert answer.status_code == 202, answer.text
    (rcpt,) = answer.json()["recipients"]
    assert rcpt["status"] == "scheduled"
    assert claim(store, DELIVERIES, "w", 10, timedelta(minutes=1)) == []
    later = claim(store, DELIVERIES, "w", 10, timedelta(minutes=1), now=send_at)
    assert [str(r.id) for r in later] == [rcpt["delivery_id"]]
    with store.read() as conn:
        assert conn.execute(select(messages.c.send_at)).scalar_one() == send_at


def test_scheduled_deliveries_show_in_the_queue_and_cancel(
    client: TestClient, store: Store
) -> None:
    send_at = _iso(datetime.now(UTC) + timedelta(minutes=30))
    one = client.post("/api/v1/messages", json={**MSG, "send_at": send_at}).json()
    client.post(
        "/api/v1/messages/batch",
        json={
            "messages": [
                {**MSG, "to": [f"b{i}@dest.test"], "send_at": send_at, "tag": "later"}
                for i in range(5)
            ]
        },
    )
    queue = client.get("/api/v1/deliveries").json()["data"]
    assert len(queue) == 6 and {d["status"] for d in queue} == {"scheduled"}
    detail = client.get(f"/api/v1/messages/{one['id']}").json()
    assert detail["recipients"][0]["next_attempt_at"].startswith(send_at[:16])

    delivery = one["recipients"][0]["delivery_id"]
    assert client.post(f"/api/v1/deliveries/{delivery}/cancel").status_code == 200
    bulk = client.post("/api/v1/deliveries/cancel", json={"status": "scheduled", "tag": "later"})
    assert bulk.json()["changed"] == 5
    with store.read() as conn:
        assert set(conn.execute(select(deliveries.c.status)).scalars()) == {"cancelled"}


def test_a_message_is_cancelled_whole_and_only_what_is_not_sent(
    client: TestClient, store: Store
) -> None:
    send_at = _iso(datetime.now(UTC) + timedelta(minutes=30))
    to = [f"r{i}@dest.test" for i in range(4)]
    sent = client.post("/api/v1/messages", json={**MSG, "to": to, "send_at": send_at}).json()
    other = client.post("/api/v1/messages", json={**MSG, "send_at": send_at}).json()
    ids = {r["email"]: uuid.UUID(r["delivery_id"]) for r in sent["recipients"]}
    with store.write() as conn:  # one already went out, one is held, one is deferred
        for email, status in (("r0@dest.test", "delivered"), ("r1@dest.test", "held")):
            conn.execute(
                update(deliveries).where(deliveries.c.id == ids[email]).values(status=status)
            )
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == ids["r2@dest.test"])
            .values(status="deferred")
        )

    answer = client.post(f"/api/v1/messages/{sent['id']}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"changed": 3}
    with store.read() as conn:
        states = dict(conn.execute(select(deliveries.c.recipient, deliveries.c.status)).all())
        cancelled = conn.execute(
            select(events.c.delivery_id, events.c.data).where(events.c.type == "delivery.cancelled")
        ).all()
    assert states == {
        "r0@dest.test": "delivered",
        "r1@dest.test": "cancelled",
        "r2@dest.test": "cancelled",
        "r3@dest.test": "cancelled",
        "a@dest.test": "scheduled",  # the other message is untouched
    }
    assert {e.delivery_id for e in cancelled} == {ids[f"r{i}@dest.test"] for i in (1, 2, 3)}
    assert {e.data["previous_status"] for e in cancelled} == {"held", "deferred", "scheduled"}
    # Nothing left to cancel: a count of 0, not an error.
    assert client.post(f"/api/v1/messages/{sent['id']}/cancel").json() == {"changed": 0}

    # Another app cannot cancel (nor learn of) this app's message.
    stranger = tenancy.create_app(store, "stranger")
    refused = client.post(
        f"/api/v1/messages/{other['id']}/cancel",
        headers={"Authorization": f"Bearer {stranger.api_key}"},
    )
    assert refused.status_code == 404
    assert refused.json()["error"]["field"] == "id"
    with store.read() as conn:
        assert (
            conn.execute(
                select(deliveries.c.status).where(deliveries.c.message_id == uuid.UUID(other["id"]))
            ).scalar_one()
            == "scheduled"
        )


@pytest.mark.parametrize(
    ("send_at", "says"),
    [
        ("tomorrow", "RFC 3339"),
        ("2026-12-24T18:00:00", "time zone"),
        ("31 days ahead", "30 days"),
    ],
)
def test_a_bad_send_at_is_refused_naming_the_field(
    client: TestClient, send_at: str, says: str
) -> None:
    if send_at == "31 days ahead":  # (computed here: test ids must be the same on every worker)
        send_at = _iso(datetime.now(UTC) + timedelta(days=31))
    answer = client.post("/api/v1/messages", json={**MSG, "send_at": send_at})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "send_at" and says in error["message"]


def test_a_send_at_in_the_past_sends_now(client: TestClient) -> None:
    past = _iso(datetime.now(UTC) - timedelta(minutes=5))
    answer = client.post("/api/v1/messages", json={**MSG, "send_at": past}).json()
    assert answer["recipients"][0]["status"] == "queued"


def test_smtp_mail_is_scheduled_by_its_x_postbode_send_at_header(store: Store) -> None:
    from postbode.ingest.accept import Acceptor, Submission

    app = tenancy.create_app(store, "smtp-shop")
    tenancy.add_domain(store, "smtp-shop", "smtp-shop.test")
    send_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    raw = (
        "From: a@smtp-shop.test\r\nTo: b@dest.test\r\nSubject: s\r\n"
        f"X-Postbode-Send-At: {_iso(send_at)}\r\n\r\nbody\r\n"
    ).encode()
    prepared = Acceptor(store, "mta.test", allow_unverified=True).prepare(
        Submission(app.app_id, "smtp", "a@smtp-shop.test", ["b@dest.test"], raw)
    )
    assert prepared.sub.send_at == send_at
    assert b"X-Postbode-Send-At" not in prepared.raw
