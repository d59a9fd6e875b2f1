"""POST /api/v1/messages/batch: many messages, or one message for many recipients each with
their own model; each item accepted or refused alone, with idempotency per item."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        c.headers["Authorization"] = f"Bearer {app.api_key}"
        yield c


def _count(store: Store) -> int:
    with store.read() as conn:
        return conn.execute(select(func.count()).select_from(messages)).scalar_one()


def test_each_message_is_accepted_or_refused_alone(client: TestClient, store: Store) -> None:
    ok = {"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "s", "text": "t"}
    answer = client.post(
        "/api/v1/messages/batch",
        json={
            "messages": [
                ok,
                {**ok, "to": ["not an address"]},
                {**ok, "from": "x@elsewhere.test"},
                {**ok, "template": "missing"},
                {**ok, "subject": None, "text": None, "template": "missing"},
                {**ok, "to": ["b@dest.test"]},
            ]
        },
    )
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert (out["accepted"], out["failed"]) == (2, 4)
    assert [r["status"] for r in out["data"]] == [
        "accepted",
        "error",
        "error",
        "error",
        "error",
        "accepted",
    ]
    assert out["data"][1]["error"]["field"] == "messages.1.to.0"
    assert out["data"][2]["error"]["field"] == "messages.2.from"
    # the subject comes from the template
    assert out["data"][3]["error"]["field"] == "messages.3.subject"
    assert out["data"][4]["error"]["field"] == "messages.4.template"
    assert out["data"][0]["id"] != out["data"][5]["id"]
    assert _count(store) == 2


def test_one_message_for_many_recipients_each_with_their_model(
    client: TestClient, store: Store
) -> None:
    client.post(
        "/api/v1/templates",
        json={"alias": "w", "subject": "Hi {{ name }}", "text": "{{ name }} has {{ plan }}"},
    )
    answer = client.post(
        "/api/v1/messages/batch",
        json={
            "message": {"from": "orders@shop.test", "template": "w", "model": {"plan": "Gold"}},
            "recipients": [
                {"to": "ann@dest.test", "model": {"name": "Ann"}},
                {"to": "bob@dest.test", "model": {"name": "Bob", "plan": "Free"}},
                {"to": "nobody"},
            ],
        },
    ).json()
    assert [r["status"] for r in answer["data"]] == ["accepted", "accepted", "error"]
    assert answer["data"][2]["error"]["field"] == "recipients.2.to"
    with store.read() as conn:
        subjects = sorted(conn.execute(select(messages.c.subject, messages.c.template)).all())
    assert subjects == [("Hi Ann", "w"), ("Hi Bob", "w")]


def test_idempotency_per_item(client: TestClient, store: Store) -> None:
    item = {"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "s", "text": "t"}
    body = {
        "messages": [
            {**item, "idempotency_key": "order-1"},
            {**item, "idempotency_key": "order-2"},
        ]
    }
    first = client.post("/api/v1/messages/batch", json=body).json()
    body["messages"].append({**item, "idempotency_key": "order-3"})
    second = client.post("/api/v1/messages/batch", json=body).json()
    assert [r["id"] for r in second["data"][:2]] == [r["id"] for r in first["data"]]
    assert _count(store) == 3
    body["messages"][0]["subject"] = "changed"
    third = client.post("/api/v1/messages/batch", json=body).json()
    assert third["data"][0]["error"]["code"] == "idempotency_conflict"
    assert _count(store) == 3


def test_bad_batches_are_refused_naming_the_field(client: TestClient) -> None:
    item = {"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "s", "text": "t"}
    too_many = client.post("/api/v1/messages/batch", json={"messages": [item] * 501})
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "messages"
    both = client.post("/api/v1/messages/batch", json={"messages": [item], "message": item})
    assert both.status_code == 422
    not_json = client.post(
        "/api/v1/messages/batch", content=b"{", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422
    with_to = client.post(
        "/api/v1/messages/batch", json={"message": item, "recipients": [{"to": "b@dest.test"}]}
    )
    assert with_to.json()["error"]["field"] == "message.to"
