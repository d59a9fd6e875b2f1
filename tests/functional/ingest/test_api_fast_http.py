"""POST /api/v1/messages over real HTTP to `postbode serve`, whose listener answers it before
FastAPI's router: accepted, refused, replayed, and the connection kept usable."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import SMTP

import httpx
import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.store.schema import raw_messages
from postbode.testing.process import PostbodeProcess, free_port

MAX_MESSAGE = 20_000
MESSAGE = {
    "from": "Shop <orders@shop.test>",
    "to": ["alice@dest.test"],
    "subject": "Your order 12",
    "text": "Thanks for your order.\r\n" * 20,
    "html": "<p>Thanks for your <b>order</b>.</p>",
    "attachments": [{"filename": "invoice.pdf", "content": "JVBERi0xLjQK"}],
    "tag": "order-confirmation",
}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PostbodeProcess, str, Store]]:
    data_dir = tmp_path_factory.mktemp("serve")
    store = create_store(Settings(data_dir=data_dir))  # migrates
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    process = PostbodeProcess(
        data_dir,
        {
            "POSTBODE_SMTP_MAX_MESSAGE_SIZE": str(MAX_MESSAGE),
            # Nothing leaves loopback: deliveries meet a closed port and are deferred.
            "POSTBODE_TRANSPORT_MAP": f"dest.test=127.0.0.1:{free_port()}",
            "POSTBODE_DNS_NAMESERVERS": f"127.0.0.1:{free_port()}",
        },
    )
    process.start()
    try:
        yield process, app.api_key, store
    finally:
        assert process.stop() == 0, process.log()
        store.dispose()


@pytest.fixture
def client(server: tuple[PostbodeProcess, str, Store]) -> Iterator[httpx.Client]:
    process, api_key, _ = server
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=process.http_url, headers=headers, timeout=30) as c:
        yield c


def test_accepts_and_stores_the_message(
    client: httpx.Client, server: tuple[PostbodeProcess, str, Store]
) -> None:
    r = client.post("/api/v1/messages", json=MESSAGE)
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert set(answer) == {"id", "message_id", "recipients"}
    assert [(x["email"], x["status"]) for x in answer["recipients"]] == [
        ("alice@dest.test", "queued")
    ]
    with server[2].read() as conn:
        data = conn.execute(
            select(raw_messages.c.data).where(raw_messages.c.message_id == uuid.UUID(answer["id"]))
        ).scalar_one()
    msg = message_from_bytes(zlib.decompress(data), policy=SMTP)
    assert msg["Subject"] == "Your order 12" and msg["Message-ID"] == answer["message_id"]
    types = [p.get_content_type() for p in msg.walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]


def test_refusals_keep_the_connection_usable(client: httpx.Client) -> None:
    answers = [
        client.post(
            "/api/v1/messages", content=b'{"from": ', headers={"Content-Type": "application/json"}
        ),
        client.post("/api/v1/messages", json={**MESSAGE, "to": ["nobody"]}),
        client.post("/api/v1/messages", json={**MESSAGE, "text": "x" * 2_000_000}),
        client.post("/api/v1/messages", json=MESSAGE, headers={"Authorization": "Bearer pb_x_y"}),
        client.post(
            "/api/v1/messages",
            content=b"x" * 5_000_000,
            headers={"Authorization": "Bearer nope", "Content-Type": "application/json"},
        ),
        client.post("/api/v1/messages", json=MESSAGE),
    ]
    assert [(r.status_code, r.json().get("error", {}).get("code")) for r in answers] == [
        (422, "invalid_json"),
        (422, "invalid_address"),
        (413, "too_large"),
        (401, "unauthorized"),
        (401, "unauthorized"),
        (202, None),
    ]
    assert answers[1].json()["error"]["field"] == "to.0"
    assert answers[3].headers["www-authenticate"] == "Bearer"


def test_a_body_streamed_without_length_is_capped(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    r = client.post(
        "/api/v1/messages", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_idempotency_key_replays_and_conflicts(client: httpx.Client) -> None:
    key = {"Idempotency-Key": "http-order-12"}
    first = client.post("/api/v1/messages", json=MESSAGE, headers=key)
    again = client.post(
        "/api/v1/messages",
        content=json.dumps(dict(reversed(MESSAGE.items())), indent=1).encode(),
        headers={**key, "Content-Type": "application/json"},
    )
    other = client.post("/api/v1/messages", json={**MESSAGE, "subject": "x"}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"


def test_other_routes_still_answer(client: httpx.Client) -> None:
    assert client.get("/api/v1/messages").status_code == 200
    assert client.get("/healthz").json()["status"] == "ok"
    paths = client.get("/api/openapi.json").json()["paths"]
    assert "post" in paths["/api/v1/messages"]
