"""Inbound mail end to end on loopback: SMTP in without AUTH, routes, verification against the
loopback DNS, the signed hand-off to the app's endpoint, retries, hold and release, refusals."""

from __future__ import annotations

import base64
import hashlib
import json
import smtplib
import time
from collections import Counter
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import dkim
import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook

from postbode import tenancy
from postbode.endpoints.destinations import BLOCKED_TEXT, DestinationPolicy
from postbode.inbound import manage, routes
from postbode.store.engine import Store
from postbode.store.schema import events, inbound_attempts, inbound_messages, messages
from postbode.testing.hostile_mail import corpus

from .conftest import Endpoint, InboundPostbode

REPLY = (
    "Yes, please ship it to the new address.\n"
    "\n"
    "-- \n"
    "Alice Example\n"
    "\n"
    "On Mon, 7 Dec 2026 at 10:00, Shop <orders@shop.test> wrote:\n"
    "> Your order 42 is ready. Where shall we send it?\n"
)


def reply_message(attachment: bytes = b"%PDF-1.4 invoice\n", *, key: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@sender.test>"
    msg["To"] = "Shop Support <support+order-42@in.shop.test>"
    msg["Cc"] = "Bob <bob@sender.test>"
    msg["Subject"] = "Re: Your order 42 — où?"
    msg["Message-ID"] = "<reply-1@sender.test>"
    msg["In-Reply-To"] = "<order-42@shop.test>"
    msg["References"] = "<order-42@shop.test>"
    msg["Date"] = "Mon, 07 Dec 2026 10:05:00 +0100"
    msg.set_content(REPLY)
    msg.add_alternative("<p>Yes, please ship it to the <b>new</b> address.</p>", subtype="html")
    msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="invoice-42.pdf")
    raw = msg.as_bytes(policy=SMTP_POLICY)
    if key is not None:
        signature = dkim.sign(
            raw, b"s1", b"sender.test", key.encode(), include_headers=[b"from", b"to", b"subject"]
        )
        raw = signature + raw
    return raw


def send(
    postbode: InboundPostbode, raw: bytes, to: str = "support+order-42@in.shop.test"
) -> tuple[int, bytes]:
    """Hand `raw` over as a receiving MX gets it (no AUTH); the reply to the end of DATA."""
    with smtplib.SMTP(postbode.host, postbode.port, local_hostname="mta.sender.test") as client:
        client.ehlo()
        assert client.mail("bounces@sender.test")[0] == 250
        code, text = client.rcpt(to)
        if code != 250:
            return code, text
        return client.data(raw)


LOOPBACK_ALLOWED = DestinationPolicy.parse("127.0.0.0/8")  # as inbound_settings allow


def add_route(store: Store, app: tenancy.NewApp, pattern: str, **kwargs: Any) -> dict[str, Any]:
    return routes.create_route(store, app.app_id, pattern, policy=LOOPBACK_ALLOWED, **kwargs)


def event_types(store: Store) -> Counter[str]:
    with store.read() as conn:
        return Counter(conn.execute(select(events.c.type)).scalars())


def inbound_rows(store: Store) -> list[Any]:
    with store.read() as conn:
        return list(conn.execute(select(inbound_messages)).all())


def wait_status(store: Store, status: str, count: int = 1, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in inbound_rows(store) if r.status == status]
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"{[r.status for r in inbound_rows(store)]}: not {count} {status}")
        time.sleep(0.05)


def test_a_reply_reaches_the_app_signed_parsed_and_verified(
    postbode: InboundPostbode,
    store: Store,
    shop: tenancy.NewApp,
    endpoint: Endpoint,
    sender_key: str,
) -> None:
    route = add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    postbode.refresh()
    attachment = bytes(range(256)) * 64
    code, text = send(postbode, reply_message(attachment, key=sender_key))
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), text

    request = endpoint.wait_for(1)[0]
    payload = Webhook(route["secret"]).verify(request.body, request.headers)
    assert request.headers["webhook-id"] == payload["id"]
    assert payload["mailbox_hash"] == "order-42"
    assert payload["route"] == {"id": route["id"], "match": "support@in.shop.test"}
    assert payload["envelope"]["rcpt_to"] == "support+order-42@in.shop.test"
    assert payload["envelope"]["helo"] == "mta.sender.test"
    assert payload["from"] == {"email": "alice@sender.test", "name": "Alice Example"}
    assert payload["cc"] == [{"email": "bob@sender.test", "name": "Bob"}]
    assert payload["subject"] == "Re: Your order 42 — où?"
    assert payload["in_reply_to"] == "<order-42@shop.test>"
    assert payload["references"] == ["<order-42@shop.test>"]
    assert payload["text"] == REPLY
    assert "<b>new</b>" in payload["html"]
    assert payload["stripped_text_reply"] == "Yes, please ship it to the new address."
    [pdf] = payload["attachments"]
    assert pdf["filename"] == "invoice-42.pdf" and pdf["content_type"] == "application/pdf"
    assert base64.b64decode(pdf["content"]) == attachment
    assert pdf["sha256"] == hashlib.sha256(attachment).hexdigest()
    verification = payload["verification"]
    assert verification["spf"]["result"] == "pass"
    assert [d["result"] for d in verification["dkim"]] == ["pass"]
    assert verification["dmarc"]["result"] == "pass"
    assert verification["dmarc"]["policy"] == "reject"

    [row] = wait_status(store, "delivered")
    assert row.attempts == 1 and row.last_status_code == 200
    assert event_types(store) == {"inbound.received": 1, "inbound.delivered": 1}
    with store.read() as conn:  # outgoing mail is untouched
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0


def test_dkim_fails_when_one_body_byte_is_changed(
    postbode: InboundPostbode,
    store: Store,
    shop: tenancy.NewApp,
    endpoint: Endpoint,
    sender_key: str,
) -> None:
    route = add_route(store, shop, "*@in.shop.test", url=endpoint.url)
    postbode.refresh()
    raw = reply_message(key=sender_key)
    altered = raw.replace(b"new address", b"New address", 1)
    assert altered != raw
    assert send(postbode, altered, "anyone@in.shop.test")[0] == 250

    payload = Webhook(route["secret"]).verify(
        endpoint.wait_for(1)[0].body, endpoint.wait_for(1)[0].headers
    )
    assert payload["mailbox_hash"] == ""
    verification = payload["verification"]
    assert [d["result"] for d in verification["dkim"]] == ["fail"]
    assert "body hash" in verification["dkim"][0]["detail"]
    assert verification["spf"]["result"] == "pass"
    # DMARC is reported: SPF is aligned (sender.test in MAIL FROM and From), so it passes.
    assert verification["dmarc"]["result"] == "pass"
    assert "dkim=fail header.d=sender.test" in verification["header"]


def test_reject_route_answers_550_at_rcpt(
    postbode: InboundPostbode, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    add_route(store, shop, "noreply@in.shop.test", action="reject")
    postbode.refresh()
    code, text = send(postbode, reply_message(), "noreply@in.shop.test")
    assert (code, text) == (550, b"5.1.1 Recipient address rejected")
    code, text = send(postbode, reply_message(), "nobody@in.shop.test")
    assert (code, text) == (550, b"5.1.1 No such recipient here")
    assert inbound_rows(store) == []


def test_a_foreign_domain_is_refused_and_nothing_is_stored(
    postbode: InboundPostbode, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    postbode.refresh()
    with smtplib.SMTP(postbode.host, postbode.port, local_hostname="mta.sender.test") as client:
        client.ehlo()
        client.mail("spammer@sender.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1"), (code, text)
        assert client.rcpt("support@in.shop.test")[0] == 250
        # with an inbound recipient in hand, a foreign one is a relay attempt
        assert client.rcpt("victim@elsewhere.test") == (550, b"5.7.1 Relaying denied")
        client.rset()
        client.mail("spammer@sender.test")
        assert client.rcpt("victim@elsewhere.test")[0] >= 500
        code, _ = client.docmd("DATA")
        assert code == 503  # no recipient was taken
    assert inbound_rows(store) == []
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0


def test_hold_keeps_the_message_and_release_posts_it(
    postbode: InboundPostbode, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    route = add_route(store, shop, "orders@in.shop.test", url=endpoint.url, action="hold")
    postbode.refresh()
    assert send(postbode, reply_message(), "orders+77@in.shop.test")[0] == 250
    [held] = wait_status(store, "held")
    assert held.verification is not None  # verified when it arrived, not when released
    assert endpoint.requests == []

    manage.release(store, shop.app_id, held.id)
    postbode.notify()
    request = endpoint.wait_for(1)[0]
    payload = Webhook(route["secret"]).verify(request.body, request.headers)
    assert payload["id"] == str(held.id) and payload["mailbox_hash"] == "77"
    wait_status(store, "delivered")
    with pytest.raises(routes.RouteError, match="not held"):
        manage.release(store, shop.app_id, held.id)


def test_an_endpoint_down_three_times_gets_it_the_fourth_all_logged(
    postbode: InboundPostbode,
    store: Store,
    shop: tenancy.NewApp,
    make_endpoint: Any,
) -> None:
    down = make_endpoint((503, b"maintenance"), (502, b"bad gateway"), (500, b"oops"), (200, b""))
    add_route(store, shop, "support@in.shop.test", url=down.url)
    postbode.refresh()
    assert send(postbode, reply_message(), "support@in.shop.test")[0] == 250

    requests = down.wait_for(4, timeout=60)
    assert len({r.headers["webhook-id"] for r in requests}) == 1  # one message, retried
    [row] = wait_status(store, "delivered")
    assert row.attempts == 4
    with store.read() as conn:
        log = conn.execute(
            select(inbound_attempts.c.status_code, inbound_attempts.c.response_body)
            .where(inbound_attempts.c.inbound_id == row.id)
            .order_by(inbound_attempts.c.started_at)
        ).all()
    assert [tuple(a) for a in log] == [
        (503, "maintenance"),
        (502, "bad gateway"),
        (500, "oops"),
        (200, ""),
    ]
    assert event_types(store) == {"inbound.received": 1, "inbound.delivered": 1}
    detail = manage.get_message(store, shop.app_id, row.id)
    assert [a["status_code"] for a in detail["attempt_log"]] == [503, 502, 500, 200]


def test_retries_end_in_inbound_failed_and_replay_sends_it_again(
    inbound_settings: Any, store: Store, shop: tenancy.NewApp, make_endpoint: Any
) -> None:
    settings = inbound_settings.model_copy(update={"inbound_retry_window_seconds": 0})
    down = make_endpoint((500, b"no"), (200, b"ok"))
    add_route(store, shop, "support@in.shop.test", url=down.url)
    running = InboundPostbode(settings, store)
    try:
        assert send(running, reply_message(), "support@in.shop.test")[0] == 250
        [failed] = wait_status(store, "failed")
        assert failed.attempts == 1 and failed.last_status_code == 500
        assert event_types(store)["inbound.failed"] == 1
        manage.replay(store, shop.app_id, failed.id)
        running.notify()
        wait_status(store, "delivered")
    finally:
        running.close()
    assert len(down.requests) == 2


def test_postmark_format_is_what_a_postmark_handler_reads(
    postbode: InboundPostbode,
    store: Store,
    shop: tenancy.NewApp,
    endpoint: Endpoint,
    sender_key: str,
) -> None:
    route = add_route(store, shop, "support@in.shop.test", url=endpoint.url, format="postmark")
    postbode.refresh()
    attachment = b"\x89PNG\r\n\x1a\n" + bytes(1000)

    tickets: list[dict[str, Any]] = []
    b64 = base64.b64decode

    def postmark_inbound_handler(body: bytes) -> None:
        """A handler written against Postmark's documented inbound webhook JSON."""
        data = json.loads(body)
        tickets.append(
            {
                "from": data["FromFull"]["Email"],
                "name": data["FromName"],
                "to": [(t["Email"], t["MailboxHash"]) for t in data["ToFull"]],
                "cc": [c["Email"] for c in data["CcFull"]],
                "ticket": data["MailboxHash"],
                "recipient": data["OriginalRecipient"],
                "subject": data["Subject"],
                "reply": data["StrippedTextReply"],
                "text": data["TextBody"],
                "html": data["HtmlBody"],
                "message_id": data["MessageID"],
                "headers": {h["Name"]: h["Value"] for h in data["Headers"]},
                "files": [
                    (a["Name"], a["ContentType"], a["ContentLength"], b64(a["Content"]))
                    for a in data["Attachments"]
                ],
                "stream": data["MessageStream"],
            }
        )

    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@sender.test>"
    msg["To"] = "support+T-9@in.shop.test"
    msg["Cc"] = "bob@sender.test"
    msg["Subject"] = "Broken lamp"
    msg.set_content("It flickers.\n\nOn Tue, Shop wrote:\n> How can we help?\n")
    msg.add_attachment(attachment, maintype="image", subtype="png", filename="lamp.png")
    raw = msg.as_bytes(policy=SMTP_POLICY)
    assert send(postbode, raw, "support+T-9@in.shop.test")[0] == 250

    request = endpoint.wait_for(1)[0]
    Webhook(route["secret"]).verify(request.body, request.headers)
    postmark_inbound_handler(request.body)
    [ticket] = tickets
    assert ticket["from"] == "alice@sender.test" and ticket["name"] == "Alice Example"
    assert ticket["to"] == [("support+T-9@in.shop.test", "T-9")]
    assert ticket["cc"] == ["bob@sender.test"]
    assert ticket["ticket"] == "T-9"
    assert ticket["recipient"] == "support+T-9@in.shop.test"
    assert ticket["subject"] == "Broken lamp"
    assert ticket["reply"] == "It flickers."
    assert ticket["text"].startswith("It flickers.") and ticket["html"] == ""
    assert ticket["files"] == [("lamp.png", "image/png", len(attachment), attachment)]
    assert ticket["stream"] == "inbound"
    assert ticket["headers"]["Subject"] == "Broken lamp"
    assert "spf=pass" in ticket["headers"]["Authentication-Results"]
    assert ticket["message_id"] == str(inbound_rows(store)[0].id)


def test_large_attachments_travel_as_signed_links(
    inbound_settings: Any, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    settings = inbound_settings.model_copy(update={"inbound_attachment_inline_bytes": 1000})
    route = add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    big = bytes(range(256)) * 40
    running = InboundPostbode(settings, store)
    try:
        assert send(running, reply_message(big), "support@in.shop.test")[0] == 250
        request = endpoint.wait_for(1)[0]
    finally:
        running.close()
    payload = Webhook(route["secret"]).verify(request.body, request.headers)
    [pdf] = payload["attachments"]
    assert pdf["content"] is None and pdf["size"] == len(big)
    assert pdf["url"].startswith("http://127.0.0.1:8025/inbound/attachments/")

    from fastapi.testclient import TestClient

    from postbode.web.app import create_app

    with TestClient(create_app(settings, store)) as client:
        path = pdf["url"].removeprefix("http://127.0.0.1:8025")
        response = client.get(path)
        assert response.status_code == 200 and response.content == big
        assert response.headers["content-disposition"] == 'attachment; filename="invoice-42.pdf"'
        assert client.get(path.replace("signature=", "signature=0")).status_code == 404
        assert client.get(path.replace("/0?", "/1?")).status_code == 404


def test_hostile_mail_is_stored_and_handed_off_or_refused_with_a_reason(
    postbode: InboundPostbode, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    route = add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    postbode.refresh()
    stored: list[str] = []
    for name, raw in corpus():
        code, text = send(postbode, raw, "support@in.shop.test")
        if code == 250:
            stored.append(name)
        else:
            assert 500 <= code < 600 and len(text) > 10, (name, code, text)
    assert "huge header section (300 KB)" not in stored
    assert len(stored) >= 18
    requests = endpoint.wait_for(len(stored), timeout=120)
    for request in requests:
        payload = Webhook(route["secret"]).verify(request.body, request.headers)
        assert payload["envelope"]["rcpt_to"] == "support@in.shop.test"
    wait_status(store, "delivered", len(stored))
    # the listener is still there for the next message
    assert send(postbode, reply_message(), "support@in.shop.test")[0] == 250


def test_route_urls_go_through_the_destination_guard(
    inbound_settings: Any, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    """Refused at registration unless the operator allows the address; refused again at
    connect time when the allowance is gone (the message waits, it is not lost)."""
    with pytest.raises(routes.RouteError) as refused:
        routes.create_route(store, shop.app_id, "support@in.shop.test", url=endpoint.url)
    assert refused.value.code == "destination_not_allowed" and refused.value.field == "url"
    for inner in ("http://169.254.169.254/latest", "http://[::1]/", "http://10.0.0.8/"):
        with pytest.raises(routes.RouteError, match="not allowed"):
            routes.create_route(store, shop.app_id, "support@in.shop.test", url=inner)
    add_route(store, shop, "support@in.shop.test", url=endpoint.url)  # allowed then
    strict = inbound_settings.model_copy(update={"webhook_allow_private": ""})
    running = InboundPostbode(strict, store)
    try:
        assert send(running, reply_message(), "support@in.shop.test")[0] == 250
        deadline = time.monotonic() + 30
        while not (rows := inbound_rows(store)) or rows[0].attempts < 1:
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
    finally:
        running.close()
    [row] = inbound_rows(store)
    assert row.status == "pending" and row.last_error == BLOCKED_TEXT
    assert endpoint.requests == []
