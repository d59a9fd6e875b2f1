"""The native send API: POST, GET one and list messages; errors naming fields; idempotency."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import string
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import Acceptor, Submission, TemporaryAcceptError
from postbode.store.engine import Store
from postbode.store.schema import (
    attempts,
    deliveries,
    idempotency_keys,
    messages,
    raw_messages,
    utcnow,
)
from postbode.web.app import create_app, serving_app

PDF = b"%PDF-1.4\n\x00\xff binary \r\n bytes"
BODY: dict[str, Any] = {
    "from": "Shop <orders@shop.test>",
    "to": ["alice@dest.test", "Bob Example <bob@dest.test>"],
    "cc": ["Zoë <carol@dest.test>"],
    "bcc": ["audit@archive.test"],
    "reply_to": "Help Desk <help@shop.test>",
    "subject": "Ihre Bestellung ist unterwegs",
    "text": "Thanks for your order.",
    "html": "<p>Thanks for your <b>order</b>.</p>",
    "headers": {"X-Order": "1234", "List-Unsubscribe": "<https://shop.test/u/1>"},
    "attachments": [
        {
            "filename": "invoice.pdf",
            "content_type": "application/pdf",
            "content": base64.b64encode(PDF).decode(),
        }
    ],
    "tag": "order-shipped",
    "metadata": {"order": "1234", "customer": "c-77"},
    "stream": "broadcast",
    "track_opens": True,
    "track_clicks": False,
}
MINIMAL: dict[str, Any] = {
    "from": "orders@shop.test",
    "to": ["alice@dest.test"],
    "subject": "Hi",
    "text": "Hello",
}


@functools.cache
def _dkim_key(generate: Any = tenancy.generate_dkim_key) -> tuple[str, str]:
    return generate(1024)  # type: ignore[no-any-return]  # one key: 2048-bit ones are slow


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test makes an app and a domain; these tests use neither the SMTP password (an
    # argon2 hash) nor the DKIM key, so make both cheap.
    monkeypatch.setattr(tenancy, "generate_dkim_key", _dkim_key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


def make_app(store: Store, name: str, domain: str) -> tenancy.NewApp:
    created = tenancy.create_app(store, name)
    tenancy.add_domain(store, name, domain)
    return created


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    return make_app(store, "shop", "shop.test")


@contextlib.contextmanager
def serve(
    settings: Settings,
    store: Store,
    api_key: str,
    acceptor: Acceptor | None = None,
    *,
    fast: bool = False,
) -> Iterator[TestClient]:
    """A client of the FastAPI app, or with `fast` of the app processes serve (POST
    /api/v1/messages answered before FastAPI's router)."""
    acceptor = acceptor or Acceptor(store, settings.smtp_hostname, allow_unverified=True)
    app = serving_app if fast else create_app
    with TestClient(app(settings, store, acceptor)) as client:
        client.headers["Authorization"] = f"Bearer {api_key}"
        try:
            yield client
        finally:
            assert client.portal is not None
            client.portal.call(acceptor.close)


@pytest.fixture(params=["route", "fast"])
def client(
    settings: Settings, store: Store, shop: tenancy.NewApp, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    """A client of the FastAPI route, and of the fast path of the serving app."""
    with serve(settings, store, shop.api_key, fast=request.param == "fast") as c:
        yield c


def count(store: Store, table: Any) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def raw_message(store: Store, message_id: str) -> bytes:
    with store.read() as conn:
        data = conn.execute(
            select(raw_messages.c.data).where(raw_messages.c.message_id == uuid.UUID(message_id))
        ).scalar_one()
    return zlib.decompress(data)


def assert_error(response: Any, status: int, field: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["field"] == field, body
    if code is not None:
        assert body["error"]["code"] == code, body


# -- POST /api/v1/messages -------------------------------------------------------------------------


def test_send_stores_the_message_with_a_delivery_per_recipient(
    client: TestClient, store: Store, shop: tenancy.NewApp
) -> None:
    r = client.post("/api/v1/messages", json=BODY)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert set(answer) == {"id", "message_id", "recipients"}
    assert [x["email"] for x in answer["recipients"]] == [
        "alice@dest.test",
        "bob@dest.test",
        "carol@dest.test",
        "audit@archive.test",
    ]
    assert {x["status"] for x in answer["recipients"]} == {"queued"}
    with store.read() as conn:
        msg = conn.execute(select(messages)).mappings().one()
        dels = conn.execute(select(deliveries)).mappings().all()
    assert str(msg["id"]) == answer["id"] and msg["app_id"] == shop.app_id
    assert msg["message_id_header"] == answer["message_id"]
    assert msg["source"] == "api" and msg["stream"] == "broadcast"
    assert msg["tag"] == "order-shipped" and msg["metadata"] == {
        "order": "1234",
        "customer": "c-77",
    }
    assert msg["mail_from"] == "orders@shop.test"
    assert msg["from_header"] == "Shop <orders@shop.test>"
    assert msg["subject"] == "Ihre Bestellung ist unterwegs"
    assert msg["track_opens"] is True and msg["track_clicks"] is False
    assert {d["recipient"] for d in dels} == {x["email"] for x in answer["recipients"]}
    assert {str(d["id"]) for d in dels} == {x["delivery_id"] for x in answer["recipients"]}

    raw = raw_message(store, answer["id"])
    assert b"audit@archive.test" not in raw  # Bcc recipients get mail, but are not shown
    msg_parsed = message_from_bytes(raw, policy=SMTP)
    assert isinstance(msg_parsed, EmailMessage)
    assert msg_parsed["Bcc"] is None
    assert str(msg_parsed["To"]) == "alice@dest.test, Bob Example <bob@dest.test>"
    assert msg_parsed["Cc"].addresses[0].display_name == "Zoë"
    assert str(msg_parsed["Reply-To"]) == "Help Desk <help@shop.test>"
    assert msg_parsed["Message-ID"] == answer["message_id"]
    assert msg_parsed["Date"] is not None and msg_parsed["Received"] is not None
    assert msg_parsed["X-Order"] == "1234"
    assert msg_parsed.get_content_type() == "multipart/mixed"
    body, invoice = msg_parsed.iter_parts()
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    html = body.get_body(("html",))
    assert html is not None and "<b>order</b>" in html.get_content()
    assert invoice.get_filename() == "invoice.pdf"
    assert invoice.get_content_type() == "application/pdf"
    assert invoice.get_content() == PDF
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF line ends only


def test_send_text_only_html_only_and_guessed_attachment_type(
    client: TestClient, store: Store
) -> None:
    r = client.post("/api/v1/messages", json=MINIMAL)
    assert r.status_code == 202, r.text
    assert message_from_bytes(raw_message(store, r.json()["id"])).get_content_type() == "text/plain"
    body = {**MINIMAL, "text": None, "html": "<p>Hi</p>"}
    r = client.post("/api/v1/messages", json=body)
    assert r.status_code == 202, r.text
    assert message_from_bytes(raw_message(store, r.json()["id"])).get_content_type() == "text/html"
    att = {"filename": "photo.png", "content": base64.encodebytes(b"\x89PNG" * 40).decode()}
    r = client.post("/api/v1/messages", json={**MINIMAL, "attachments": [att]})
    assert r.status_code == 202, r.text
    parsed = message_from_bytes(raw_message(store, r.json()["id"]), policy=SMTP)
    assert isinstance(parsed, EmailMessage)
    assert [p.get_content_type() for p in parsed.iter_attachments()] == ["image/png"]
    assert count(store, messages) == 3


def test_send_with_only_bcc_and_duplicate_recipients(client: TestClient, store: Store) -> None:
    body = {**MINIMAL, "to": None, "bcc": ["a@dest.test", "A@DEST.TEST", "a@dest.test"]}
    r = client.post("/api/v1/messages", json=body)
    assert r.status_code == 202, r.text
    assert [x["email"] for x in r.json()["recipients"]] == ["a@dest.test", "A@dest.test"]
    raw = raw_message(store, r.json()["id"])
    assert b"a@dest.test" not in raw.lower()
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in raw  # RFC 5322 §3.6.3


def test_send_internationalised_addresses(client: TestClient, store: Store) -> None:
    body = {**MINIMAL, "to": ["Jörg <jörg@bücher.test>"], "subject": "Grüße"}
    r = client.post("/api/v1/messages", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["recipients"][0]["email"] == "jörg@xn--bcher-kva.test"
    assert "To: Jörg <jörg@xn--bcher-kva.test>\r\n".encode() in raw_message(store, r.json()["id"])


CASES: list[tuple[str, dict[str, Any], str | None, str | None]] = [
    # (what, change to the body (None value: leave the field out), field, code)
    ("no from", {"from": None}, "from", "missing"),
    ("no recipient", {"to": [], "cc": None, "bcc": None}, "to", "missing"),
    ("no subject", {"subject": None}, "subject", "missing"),
    ("empty subject", {"subject": ""}, "subject", "invalid"),
    ("no text or html", {"text": None, "html": None}, "text", "missing"),
    ("bad to", {"to": ["alice@dest.test", "not-an-address"]}, "to.1", "invalid_address"),
    ("bad cc", {"cc": ["carol@"]}, "cc.0", "invalid_address"),
    ("bad bcc", {"bcc": ["a@b"]}, "bcc.0", "invalid_address"),
    ("bad from", {"from": "Shop <orders@>"}, "from", "invalid_address"),
    ("bad reply_to", {"reply_to": "two@a.test, three@a.test"}, "reply_to", "invalid_address"),
    ("to not a list", {"to": "alice@dest.test"}, "to", "invalid"),
    ("to of numbers", {"to": [1]}, "to.0", "invalid"),
    ("address injection", {"to": ["alice@dest.test\r\nBcc: x@evil.test"]}, "to.0", None),
    ("name injection", {"cc": ["Eve\r\nBcc: x@evil.test <eve@dest.test>"]}, "cc.0", None),
    ("subject CRLF", {"subject": "Hi\r\nBcc: x@evil.test"}, "subject", "header_injection"),
    ("subject LF", {"subject": "Hi\nX: y"}, "subject", "header_injection"),
    (
        "subject encoded CRLF",
        {"subject": "=?utf-8?q?Hi=0D=0ABcc:_x@evil.test?="},
        "subject",
        "header_injection",
    ),
    ("header CRLF", {"headers": {"X-Foo": "a\r\nBcc: x@evil.test"}}, "headers.X-Foo", None),
    ("header NUL", {"headers": {"X-Foo": "a\x00b"}}, "headers.X-Foo", "nul_character"),
    (
        "header name CRLF",
        {"headers": {"X-Foo\r\nBcc": "x@evil.test"}},
        "headers.X-Foo\r\nBcc",
        "invalid_header_name",
    ),
    ("header name space", {"headers": {"X Foo": "x"}}, "headers.X Foo", "invalid_header_name"),
    ("Bcc header", {"headers": {"Bcc": "x@evil.test"}}, "headers.Bcc", "reserved_header"),
    ("bcc header", {"headers": {"bcc": "x@evil.test"}}, "headers.bcc", "reserved_header"),
    ("From header", {"headers": {"From": "x@evil.test"}}, "headers.From", "reserved_header"),
    ("Content-Type", {"headers": {"Content-Type": "text/x"}}, "headers.Content-Type", None),
    ("Message-ID", {"headers": {"Message-ID": "<x@y>"}}, "headers.Message-ID", None),
    ("Received", {"headers": {"Received": "from x"}}, "headers.Received", None),
    ("control header", {"headers": {"X-Postbode-Stream": "x"}}, "headers.X-Postbode-Stream", None),
    ("long header", {"headers": {"X-Foo": "x" * 999}}, "headers.X-Foo", "header_too_long"),
    ("headers a list", {"headers": [["X-Foo", "x"]]}, "headers", "invalid"),
    (
        "bad base64",
        {"attachments": [{"filename": "a.pdf", "content": "not base64!"}]},
        "attachments.0.content",
        "invalid_base64",
    ),
    (
        "bad base64 padding",
        {"attachments": [{"filename": "a.pdf", "content": "QUJD="}]},
        "attachments.0.content",
        "invalid_base64",
    ),
    (
        "no filename",
        {"attachments": [{"content": "QUJD"}]},
        "attachments.0.filename",
        "missing",
    ),
    (
        "filename CRLF",
        {"attachments": [{"filename": "a\r\nX: y", "content": "QUJD"}]},
        "attachments.0.filename",
        "header_injection",
    ),
    (
        "bad content type",
        {"attachments": [{"filename": "a", "content_type": "pdf", "content": "QUJD"}]},
        "attachments.0.content_type",
        "invalid_content_type",
    ),
    (
        "multipart content type",
        {"attachments": [{"filename": "a", "content_type": "multipart/mixed", "content": ""}]},
        "attachments.0.content_type",
        "invalid_content_type",
    ),
    ("metadata number", {"metadata": {"order": 42}}, "metadata.order", "invalid"),
    ("metadata key", {"metadata": {"bad key": "x"}}, "metadata.bad key", "invalid"),
    (
        "metadata keys",
        {"metadata": {f"k{i}": "v" for i in range(21)}},
        "metadata",
        "invalid",
    ),
    (
        "metadata size",
        {"metadata": {f"k{i}": "v" * 999 for i in range(5)}},
        "metadata",
        "metadata_too_large",
    ),
    ("metadata value", {"metadata": {"k": "v" * 1001}}, "metadata.k", "invalid"),
    ("bad stream", {"stream": "marketing"}, "stream", "invalid"),
    ("bad track_opens", {"track_opens": "yes"}, "track_opens", "invalid"),
    ("bad tag", {"tag": "a" * 101}, "tag", "invalid"),
    ("tag CRLF", {"tag": "a\r\nb"}, "tag", "header_injection"),
    ("text NUL", {"text": "a\x00b"}, "text", "nul_character"),
    ("html surrogate", {"html": "\ud800"}, "html", "invalid_unicode"),
    ("unknown field", {"attachment": []}, "attachment", "unknown_field"),
]


@pytest.mark.parametrize(
    ("change", "field", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_send_refuses_invalid_requests_naming_the_field(
    client: TestClient,
    store: Store,
    change: dict[str, Any],
    field: str | None,
    code: str | None,
) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}  # None: left out
    r = client.post("/api/v1/messages", content=json.dumps(body).encode(), headers=JSON)
    assert_error(r, 422, field, code)
    assert count(store, messages) == 0


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("content", "headers", "code"),
    [
        (b'{"from": ', JSON, "invalid_json"),
        (b"\xff\xfe", JSON, "invalid_json"),
        (b"[1, 2]", JSON, "invalid"),
        (b'"a string"', JSON, "invalid"),
        (b"null", JSON, "invalid"),
        (b"", JSON, "missing"),
        (json.dumps(MINIMAL).encode(), {"Content-Type": "text/plain"}, "invalid"),
    ],
)
def test_send_refuses_what_is_not_a_json_object(
    client: TestClient, store: Store, content: bytes, headers: dict[str, str], code: str
) -> None:
    r = client.post("/api/v1/messages", content=content, headers=headers)
    assert r.status_code in (400, 422), r.text
    body = r.json()
    assert set(body["error"]) == {"code", "message", "field"}
    if r.status_code == 422:
        assert body["error"]["code"] == code and body["error"]["field"] is None
    assert count(store, messages) == 0


@pytest.fixture
def small(settings: Settings) -> Settings:
    return settings.model_copy(update={"smtp_max_message_size": 10_000, "smtp_max_recipients": 3})


def test_send_refuses_oversize_messages(
    small: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    def att(n: int) -> dict[str, str]:
        return {"filename": "a.bin", "content": base64.b64encode(b"x" * n).decode()}

    with serve(small, store, shop.api_key) as client:
        r = client.post("/api/v1/messages", json={**MINIMAL, "attachments": [att(8000)]})
        assert_error(r, 422, "attachments.0.content", "too_large")
        r = client.post("/api/v1/messages", json={**MINIMAL, "attachments": [att(4000)] * 2})
        assert_error(r, 422, "attachments", "too_large")
        r = client.post("/api/v1/messages", json={**MINIMAL, "text": "x" * 10_000})
        assert_error(r, 422, "text", "too_large")
        r = client.post("/api/v1/messages", json={**MINIMAL, "attachments": [att(7000)]})
        assert_error(r, 422, "attachments", "too_large")  # fits alone, not with the rest
        r = client.post("/api/v1/messages", json={**MINIMAL, "attachments": [att(5000)]})
        assert r.status_code == 202, r.text
        # A body far beyond any message that fits is not even read.
        r = client.post("/api/v1/messages", json={**MINIMAL, "text": "x" * 1_100_000})
        assert_error(r, 413, None, "too_large")
    assert count(store, messages) == 1


def test_send_refuses_too_many_recipients(
    small: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    with serve(small, store, shop.api_key) as client:
        body = {**MINIMAL, "to": ["a@dest.test", "b@dest.test"], "cc": ["c@dest.test"]}
        assert client.post("/api/v1/messages", json=body).status_code == 202
        r = client.post("/api/v1/messages", json={**body, "bcc": ["d@dest.test"]})
        assert_error(r, 422, "bcc", "too_many_recipients")


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer pb_nope_nope", "Basic dXNlcjpwYXNz", "pb_x"]
)
def test_send_without_a_valid_key_is_401(
    client: TestClient, store: Store, authorization: str | None
) -> None:
    del client.headers["Authorization"]
    headers = {} if authorization is None else {"Authorization": authorization}
    r = client.post("/api/v1/messages", json=MINIMAL, headers=headers)
    assert_error(r, 401, None, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    # The key is checked before the body is read: no parsing, no 413 for strangers.
    for content in (b"{not json", b"x" * 60_000_000):
        r = client.post("/api/v1/messages", content=content, headers={**headers, **JSON})
        assert_error(r, 401, None, "unauthorized")
    assert_error(client.get("/api/v1/messages", headers=headers), 401, None, "unauthorized")
    assert count(store, messages) == 0


def test_send_with_a_revoked_key_is_401(
    client: TestClient, store: Store, shop: tenancy.NewApp
) -> None:
    (credential,) = [c for c in tenancy.list_credentials(store, "shop") if c["kind"] == "api"]
    tenancy.revoke_credential(store, credential["id"])
    assert_error(client.post("/api/v1/messages", json=MINIMAL), 401, None, "unauthorized")


def test_send_from_a_domain_not_of_this_app(client: TestClient, store: Store) -> None:
    make_app(store, "other", "other.test")
    for sender in ("orders@other.test", "orders@unknown.test", "Shop <orders@sub.shop.test>"):
        r = client.post("/api/v1/messages", json={**MINIMAL, "from": sender})
        assert_error(r, 422, "from", "foreign_domain")
    assert count(store, messages) == 0


def test_idempotency_key_replays_the_first_answer(client: TestClient, store: Store) -> None:
    key = {"Idempotency-Key": "order-1234-shipped"}
    first = client.post("/api/v1/messages", json=BODY, headers=key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    # The same JSON with other key order and white space is the same request.
    same = json.dumps(dict(reversed(BODY.items())), indent=2).encode()
    again = client.post("/api/v1/messages", content=same, headers={**key, **JSON})
    assert again.status_code == 202, again.text
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(store, messages) == 1 and count(store, deliveries) == 4

    r = client.post("/api/v1/messages", json={**BODY, "subject": "Another"}, headers=key)
    assert_error(r, 409, "Idempotency-Key", "idempotency_conflict")
    other = client.post("/api/v1/messages", json=BODY, headers={"Idempotency-Key": "other"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert count(store, messages) == 2


def test_idempotency_keys_are_per_app(client: TestClient, store: Store, settings: Settings) -> None:
    key = {"Idempotency-Key": "k1"}
    first = client.post("/api/v1/messages", json=MINIMAL, headers=key)
    other = make_app(store, "other", "other.test")
    with serve(settings, store, other.api_key) as other_client:
        body = {**MINIMAL, "from": "x@other.test"}
        r = other_client.post("/api/v1/messages", json=body, headers=key)
        assert r.status_code == 202 and r.json()["id"] != first.json()["id"]
    assert count(store, messages) == 2


def test_idempotency_key_can_be_reused_after_24_hours(client: TestClient, store: Store) -> None:
    key = {"Idempotency-Key": "k1"}
    first = client.post("/api/v1/messages", json=MINIMAL, headers=key)
    with store.write() as conn:
        conn.execute(update(idempotency_keys).values(created_at=utcnow() - timedelta(hours=25)))
    again = client.post("/api/v1/messages", json={**MINIMAL, "subject": "Later"}, headers=key)
    assert again.status_code == 202, again.text
    assert again.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ключ"])
def test_bad_idempotency_key(client: TestClient, key: str) -> None:
    r = client.post("/api/v1/messages", json=MINIMAL, headers={"Idempotency-Key": key.encode()})
    assert_error(r, 422, "Idempotency-Key")


class _Unavailable(Acceptor):
    async def accept(self, sub: Submission) -> Any:
        raise TemporaryAcceptError("the store is unavailable, try again later")


def test_store_trouble_is_503_with_retry_after(
    settings: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    unavailable = _Unavailable(store, settings.smtp_hostname)
    with serve(settings, store, shop.api_key, unavailable) as client:
        r = client.post("/api/v1/messages", json=MINIMAL)
    assert_error(r, 503, None, "unavailable")
    assert int(r.headers["Retry-After"]) > 0


# -- GET /api/v1/messages/{id} ---------------------------------------------------------------------


def test_get_message_with_deliveries_attempts_and_events(
    client: TestClient, store: Store, settings: Settings
) -> None:
    answer = client.post("/api/v1/messages", json=BODY).json()
    alice = uuid.UUID(answer["recipients"][0]["delivery_id"])
    bob = uuid.UUID(answer["recipients"][1]["delivery_id"])
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with store.write() as conn:
        conn.execute(
            insert(attempts),
            [
                {
                    "delivery_id": alice,
                    "started_at": started,
                    "duration_ms": 120,
                    "outcome": "SoftFail",
                    "mx_host": "mx.dest.test",
                    "ip": "127.0.0.1",
                    "port": 25,
                    "tls_version": "TLSv1.3",
                    "tls_cipher": "TLS_AES_256_GCM_SHA384",
                    "reply_code": 451,
                    "enhanced_status": "4.7.1",
                    "reply_text": "greylisted",
                    "transcript": "S: 220 mx\r\nC: EHLO pb\r\n",
                },
                {
                    "delivery_id": alice,
                    "started_at": started + timedelta(minutes=5),
                    "duration_ms": 80,
                    "outcome": "Delivered",
                    "mx_host": "mx.dest.test",
                    "ip": "127.0.0.1",
                    "port": 25,
                    "tls_version": None,
                    "tls_cipher": None,
                    "reply_code": 250,
                    "enhanced_status": "2.0.0",
                    "reply_text": "ok",
                    "transcript": "",
                },
            ],
        )
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == alice)
            .values(status="delivered", attempts=2, last_reply="250 2.0.0 ok", mx="mx.dest.test")
        )
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == bob)
            .values(
                status="bounced",
                attempts=1,
                bounce_category="bad_mailbox",
                bounce_status="5.1.1",
                hard=True,
            )
        )

    r = client.get(f"/api/v1/messages/{answer['id']}")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["id"] == answer["id"] and got["message_id"] == answer["message_id"]
    assert got["from"] == "Shop <orders@shop.test>" and got["mail_from"] == "orders@shop.test"
    assert got["subject"] == BODY["subject"] and got["tag"] == "order-shipped"
    assert got["metadata"] == BODY["metadata"] and got["stream"] == "broadcast"
    assert got["source"] == "api" and got["size"] > len(PDF)
    assert got["track_opens"] is True and got["track_clicks"] is False
    assert datetime.fromisoformat(got["received_at"]).tzinfo is not None
    by_email = {d["email"]: d for d in got["recipients"]}
    assert set(by_email) == {x["email"] for x in answer["recipients"]}
    assert by_email["alice@dest.test"]["status"] == "delivered"
    assert by_email["alice@dest.test"]["attempts"] == 2
    assert by_email["alice@dest.test"]["last_reply"] == "250 2.0.0 ok"
    assert by_email["alice@dest.test"]["next_attempt_at"] is None
    assert by_email["bob@dest.test"]["bounce_category"] == "bad_mailbox"
    assert by_email["bob@dest.test"]["bounce_status"] == "5.1.1"
    assert by_email["bob@dest.test"]["hard"] is True
    assert by_email["carol@dest.test"]["status"] == "queued"
    assert by_email["carol@dest.test"]["next_attempt_at"] is not None
    first, second = got["attempts"]
    assert first["recipient"] == "alice@dest.test" and first["delivery_id"] == str(alice)
    assert first["reply_code"] == 451 and first["enhanced_status"] == "4.7.1"
    assert first["mx_host"] == "mx.dest.test" and first["ip"] == "127.0.0.1"
    assert first["tls_version"] == "TLSv1.3" and first["duration_ms"] == 120
    assert first["transcript"].startswith("S: 220 mx")
    assert datetime.fromisoformat(first["started_at"]) == started
    assert second["outcome"] == "Delivered" and second["transcript"] == ""
    types = [e["type"] for e in got["events"]]
    assert types == ["message.received"] + ["delivery.queued"] * 4
    assert got["events"][0]["data"] == {"source": "api", "recipients": 4}
    assert {e["recipient"] for e in got["events"][1:]} == set(by_email)
    times = [e["at"] for e in got["events"]]
    assert times == sorted(times)


def test_get_message_of_another_app_is_404(
    client: TestClient, store: Store, settings: Settings
) -> None:
    mine = client.post("/api/v1/messages", json=MINIMAL).json()["id"]
    other = make_app(store, "other", "other.test")
    with serve(settings, store, other.api_key) as other_client:
        assert_error(other_client.get(f"/api/v1/messages/{mine}"), 404, "id", "not_found")
    assert_error(client.get(f"/api/v1/messages/{uuid.uuid4()}"), 404, "id", "not_found")
    assert_error(client.get("/api/v1/messages/not-a-uuid"), 422, "id", "invalid")
    del client.headers["Authorization"]
    assert_error(client.get(f"/api/v1/messages/{mine}"), 401, None, "unauthorized")


# -- GET /api/v1/messages --------------------------------------------------------------------------


def _send(client: TestClient, to: str, tag: str | None = None) -> str:
    r = client.post("/api/v1/messages", json={**MINIMAL, "to": [to], "tag": tag})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _pages(client: TestClient, **params: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = client.get("/api/v1/messages", params=query)
        assert r.status_code == 200, r.text
        pages.append([m["id"] for m in r.json()["data"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50


def test_list_messages_newest_first_across_pages(client: TestClient, store: Store) -> None:
    sent = [_send(client, f"user{i}@dest.test", "a" if i % 2 else "b") for i in range(7)]
    pages = _pages(client, limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [m for page in pages for m in page]
    assert listed == sorted(sent, key=lambda m: uuid.UUID(m).int, reverse=True)
    r = client.get("/api/v1/messages", params={"limit": 7})
    assert r.json()["next_cursor"] is None and len(r.json()["data"]) == 7
    item = r.json()["data"][0]
    assert set(item) == {
        "id",
        "message_id",
        "from",
        "mail_from",
        "subject",
        "tag",
        "metadata",
        "stream",
        "source",
        "received_at",
        "size",
        "recipients",
    }
    assert item["recipients"][0]["status"] == "queued"
    assert client.get("/api/v1/messages").json()["data"] == r.json()["data"]  # default page: 50


def test_list_messages_filters(client: TestClient, store: Store, settings: Settings) -> None:
    a1 = _send(client, "Ann@Dest.test", "welcome")
    b1 = _send(client, "bob@dest.test", "welcome")
    a2 = _send(client, "ann@dest.test", "reset")
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.message_id == uuid.UUID(b1))
            .values(status="bounced")
        )
        conn.execute(
            update(messages)
            .where(messages.c.id == uuid.UUID(a1))
            .values(received_at=datetime(2020, 1, 1, tzinfo=UTC))
        )
    other = make_app(store, "other", "other.test")
    with serve(settings, store, other.api_key) as other_client:
        body = {**MINIMAL, "from": "x@other.test", "to": ["ann@dest.test"], "tag": "welcome"}
        assert other_client.post("/api/v1/messages", json=body).status_code == 202
        assert len(other_client.get("/api/v1/messages").json()["data"]) == 1

    def ids(**params: Any) -> set[str]:
        return {m for page in _pages(client, **params) for m in page}

    assert ids() == {a1, b1, a2}
    assert ids(tag="welcome") == {a1, b1}
    assert ids(recipient="ann@dest.test") == {a1, a2}
    assert ids(recipient="ANN@DEST.TEST") == {a1, a2}
    assert ids(recipient="nobody@dest.test") == set()
    assert ids(status="bounced") == {b1}
    assert ids(status="queued") == {a1, a2}
    assert ids(status="queued", recipient="bob@dest.test") == set()
    assert ids(status="queued", tag="reset") == {a2}
    assert ids(since="2020-01-01T00:00:00Z", until="2020-01-01T00:00:01+00:00") == {a1}
    assert ids(since="2020-01-01T00:00:01") == {b1, a2}
    assert ids(until="2020-01-01T00:00:00Z") == set()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "sent"}, "status"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
        ({"cursor": "nope"}, "cursor"),
        ({"recipient": "no-at-sign"}, "recipient"),
        ({"tag": "t" * 101}, "tag"),
    ],
)
def test_list_messages_bad_parameters(
    client: TestClient, params: dict[str, Any], field: str
) -> None:
    assert_error(client.get("/api/v1/messages", params=params), 422, field)


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    post = spec["paths"]["/api/v1/messages"]["post"]
    assert {"202", "401", "409", "422", "503"} <= set(post["responses"])
    assert "get" in spec["paths"]["/api/v1/messages"]
    assert "get" in spec["paths"]["/api/v1/messages/{id}"]
    schemas = spec["components"]["schemas"]
    assert {"from", "to", "cc", "bcc", "attachments"} <= set(schemas["SendRequest"]["properties"])
    assert "from" in schemas["MessageDetail"]["properties"]
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}


# -- fuzzing --------------------------------------------------------------------------------------

_NASTY = [
    "",
    " ",
    "\r\n",
    "\n",
    "\r",
    "\x00",
    "\ud800",
    "\u2028",
    "é",
    "ü@ü.test",
    "<>",
    '"',
    "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=",
    "a@dest.test",
    "Name <a@dest.test>",
    "orders@shop.test",
    "x@evil.test\r\nBcc: y@evil.test",
    "Bcc",
    "Content-Type",
    "X-Postbode-Tag",
    "QUJD",
    "x" * 1000,
]
_texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(_NASTY),
    st.text(alphabet=st.sampled_from([*'aZ@<>.,;: \t"\\=?', "\r", "\n", "\x00", "é", "\ud800"])),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)
_addresses = st.one_of(
    st.sampled_from(["a@dest.test", "Zoë <z@dest.test>", "jörg@bücher.test", "b@dest.test"]),
    _texts,
)
_header_names = st.one_of(st.sampled_from(["X-A", "Bcc", "Subject", "X-Postbode-Tag"]), _texts)
_b64 = st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
_attachment = st.fixed_dictionaries(
    {"filename": _texts, "content": _b64 | _texts},
    optional={
        "content_type": st.sampled_from(["text/plain", "a/b; c=d", "message/rfc822"]) | _texts
    },
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "from": _addresses | _json,
    "to": st.lists(_addresses, max_size=3) | _json,
    "cc": st.lists(_addresses, max_size=3) | _json,
    "bcc": st.lists(_addresses, max_size=3) | _json,
    "reply_to": _addresses | _json,
    "subject": _texts | _json,
    "text": _texts | _json,
    "html": _texts | _json,
    "headers": st.dictionaries(_header_names, _texts, max_size=3) | _json,
    "attachments": st.lists(_attachment, max_size=2) | _json,
    "tag": _texts | _json,
    "metadata": st.dictionaries(_texts, _texts, max_size=3) | _json,
    "stream": st.sampled_from(["transactional", "broadcast"]) | _json,
    "track_opens": _json,
    "track_clicks": _json,
}


@st.composite
def _bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)  # not even an object, most likely
    body = dict(BODY)
    for name in draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=4)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(_FIELDS[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(_texts)] = draw(_json)
    return body


_SHOWN = {
    "received",
    "message-id",
    "date",
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}


@pytest.mark.parametrize("fast", [False, True], ids=["route", "fast"])
def test_fuzz_send_bodies(sqlite_store: Store, tmp_path: Path, fast: bool) -> None:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    settings = Settings(data_dir=tmp_path, database_url=url, secret_key="test-secret-key")
    shop = make_app(sqlite_store, "shop", "shop.test")

    with serve(settings, sqlite_store, shop.api_key, fast=fast) as client:

        @hypothesis_settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            body=st.one_of(_bodies(), st.binary(max_size=40)),
            key=st.none() | st.text(alphabet=string.printable[:95], max_size=8),
        )
        def check(body: Any, key: str | None) -> None:
            headers = {**JSON, **({"Idempotency-Key": key} if key is not None else {})}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post("/api/v1/messages", content=content, headers=headers)
            if r.status_code != 202:
                assert 400 <= r.status_code < 500, r.text
                error = r.json()["error"]
                assert set(error) == {"code", "message", "field"}
                assert isinstance(error["code"], str) and isinstance(error["message"], str)
                assert error["field"] is None or isinstance(error["field"], str)
                return
            answer = r.json()
            assert set(answer) == {"id", "message_id", "recipients"} and answer["recipients"]
            raw = raw_message(sqlite_store, answer["id"])
            assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
            assert max(len(line) for line in raw.split(b"\r\n")) <= 998
            head = BytesHeaderParser(policy=SMTP).parsebytes(raw)
            custom = body.get("headers") or {}
            allowed = _SHOWN | {str(name).lower() for name in custom}
            assert {name.lower() for name in head} <= allowed, head.keys()
            assert "bcc" not in {name.lower() for name in head}

        check()


def test_list_messages_by_reply_looks_at_a_window_a_page(
    client: TestClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reply` has no index: a page looks at SCAN_WINDOW messages at most, and a page that is
    not full by then still says where to go on; following next_cursor finds every match."""
    from postbode.web.api import messages as api

    sent = [_send(client, f"user{i}@dest.test") for i in range(11)]
    blocked = {sent[i] for i in (0, 1, 9)}
    with store.write() as conn:
        conn.execute(update(deliveries).values(last_reply="250 2.0.0 ok"))
        conn.execute(
            update(deliveries)
            .where(deliveries.c.message_id.in_([uuid.UUID(m) for m in blocked]))
            .values(last_reply="554 5.7.1 blocked using zen.spamhaus.test")
        )
    monkeypatch.setattr(api, "SCAN_WINDOW", 4)
    pages = _pages(client, reply="SPAMHAUS", limit=2)
    listed = [m for page in pages for m in page]
    assert listed == sorted(blocked, key=lambda m: uuid.UUID(m).int, reverse=True)
    # The newest 4 hold one match, the next 4 none, the last 3 two.
    assert pages == [[sent[9]], [], [sent[1], sent[0]]]
    monkeypatch.setattr(api, "SCAN_WINDOW", 5_000)
    assert _pages(client, reply="spamhaus", limit=2) == [[sent[9], sent[1]], [sent[0]]]
