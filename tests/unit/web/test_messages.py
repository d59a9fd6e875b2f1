"""One message in full, and what admins do from it: retry, cancel, release, suppress."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import insert, select, update

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import (
    attempts,
    audit_log,
    deliveries,
    messages,
    new_id,
    raw_messages,
    suppressions,
    utcnow,
)
from postbode.testing.factories import make_queued_message
from postbode.web.ui.messages import parse_source

from .conftest import Browser, Org

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


def rich_message(store: Store, app_id: int) -> tuple[Any, Any]:
    """A bounced message with an attempt, its events and an attachment."""
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = "bob@dest.test"
    msg["Subject"] = "Your invoice"
    msg["X-Campaign"] = HOSTILE
    msg.set_content("Plain words " + HOSTILE)
    msg.add_alternative("<p>Dear Bob</p>" + HOSTILE, subtype="html")
    msg.add_attachment(
        b"%PDF-1.4 ...", maintype="application", subtype="pdf", filename="invoice-42.pdf"
    )
    message_id, (delivery_id,) = make_queued_message(
        store, app_id, ["bob@dest.test"], raw=msg.as_bytes()
    )
    now = utcnow()
    with store.write() as conn:
        conn.execute(
            update(messages).where(messages.c.id == message_id).values(subject="Your invoice")
        )
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(
                status="bounced",
                attempts=1,
                bounce_category="user_unknown",
                bounce_status="5.1.1",
                hard=True,
                last_reply="550 5.1.1 <bob@dest.test>: no such user",
                last_attempt_at=now,
            )
        )
        conn.execute(
            insert(attempts).values(
                id=new_id(),
                delivery_id=delivery_id,
                started_at=now,
                duration_ms=1234,
                outcome="HardFail",
                mx_host="mx1.dest.test",
                ip="127.0.0.9",
                port=25,
                tls_version="TLSv1.3",
                tls_cipher="TLS_AES_256_GCM_SHA384",
                reply_code=550,
                enhanced_status="5.1.1",
                reply_text="no such user",
                transcript="S: 220 mx1.dest.test ESMTP\nC: EHLO mta.test\nS: 550 5.1.1 " + HOSTILE,
            )
        )
        record(
            conn,
            [
                Event(
                    app_id=app_id,
                    type=EventType.MESSAGE_RECEIVED,
                    message_id=message_id,
                    at=now - timedelta(seconds=2),
                ),
                Event(
                    app_id=app_id,
                    type=EventType.DELIVERY_BOUNCED,
                    message_id=message_id,
                    delivery_id=delivery_id,
                    recipient="bob@dest.test",
                    data={"category": "user_unknown", "hard": True, "reply": HOSTILE},
                    at=now,
                ),
            ],
        )
    return message_id, delivery_id


def test_the_detail_page_shows_everything_inert(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = rich_message(store, org.shop.app_id)
    page = admin.get(f"/messages/{message_id}").text
    for shown in (
        "Your invoice",
        "bob@dest.test",
        "mx1.dest.test",
        "127.0.0.9:25",
        "TLSv1.3",
        "1.2 s",
        "S: 220 mx1.dest.test ESMTP",
        "user_unknown",
        "5.1.1",
        "delivery.bounced",
        "message.received",
        "invoice-42.pdf",
        "application/pdf",
        "X-Campaign",
        "Plain words",
        "Load remote images",
    ):
        assert shown in page, shown
    assert "<script>window.__pwned" not in page and 'onerror="window' not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    # The HTML part is not in the page itself: only in the sandboxed frame's own response.
    assert "Dear Bob" not in page
    preview = admin.get(f"/messages/{message_id}/preview").text
    assert "Dear Bob" in preview and preview.startswith('<!doctype html><base target="_blank">')


def test_a_purged_message_says_so(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["a@dest.test"])
    with store.write() as conn:
        conn.execute(raw_messages.delete())
        conn.execute(update(messages).values(raw_purged_at=utcnow()))
    page = admin.get(f"/messages/{message_id}")
    assert "purged by the retention policy" in page.text
    assert admin.get(f"/messages/{message_id}/raw").status_code == 404


def test_broken_mime_is_shown_as_far_as_it_goes() -> None:
    parsed = parse_source(b"Subject: =?utf-8?q?broken\r\nContent-Type: multipart/mixed\r\n\r\nx")
    assert [name for name, _ in parsed.headers] == ["Subject", "Content-Type"]
    assert parsed.html is None and parsed.attachments == []
    weird = parse_source(b"Content-Type: text/plain; charset=x-no-such\r\n\r\nhello")
    assert weird.text is not None and "hello" in weird.text


def test_cancel_retry_and_release_from_the_message(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, org, _ = ui
    message_id, (first, second) = make_queued_message(
        store, org.shop.app_id, ["a@dest.test", "b@dest.test"]
    )
    base = f"/messages/{message_id}/deliveries"
    cancelled = admin.post(f"{base}/{first}/cancel")
    assert admin.flash(cancelled) == "Delivery to a@dest.test cancelled."
    again = admin.post(f"{base}/{first}/cancel")
    assert "the delivery is cancelled" in admin.flash(again)
    with store.write() as conn:
        conn.execute(update(deliveries).where(deliveries.c.id == second).values(status="held"))
    admin.post(f"{base}/{second}/release")
    with store.read() as conn:
        states = dict(conn.execute(select(deliveries.c.id, deliveries.c.status)).all())
        logged = conn.execute(
            select(
                audit_log.c.action, audit_log.c.actor, audit_log.c.target, audit_log.c.ip
            ).order_by(audit_log.c.id)
        ).all()
    assert states == {first: "cancelled", second: "queued"}
    assert [tuple(r) for r in logged if r.action.startswith("delivery.")] == [
        ("delivery.cancel", "admin@org.test", str(first), "testclient"),
        ("delivery.release", "admin@org.test", str(second), "testclient"),
    ]
    other, _ = make_queued_message(store, org.shop.app_id, ["c@dest.test"])
    # A delivery of another message is not changed through this one's page.
    assert "no delivery" in admin.flash(admin.post(f"/messages/{other}/deliveries/{second}/cancel"))
    assert admin.post(f"{base}/{second}/explode").status_code == 404


def test_suppress_a_recipient_from_the_message(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["Ann@dest.test"])
    done = admin.post(f"/messages/{message_id}/suppress", {"email": "Ann@dest.test"})
    assert admin.flash(done) == "ann@dest.test is now suppressed (all)."
    assert "already suppressed" in admin.flash(
        admin.post(f"/messages/{message_id}/suppress", {"email": "ann@dest.test"})
    )
    stranger = admin.post(f"/messages/{message_id}/suppress", {"email": "zed@dest.test"})
    assert stranger.status_code == 422
    with store.read() as conn:
        rows = conn.execute(select(suppressions.c.email, suppressions.c.source)).all()
        actions = conn.execute(select(audit_log.c.action)).scalars().all()
    assert [tuple(r) for r in rows] == [("ann@dest.test", "manual")]
    assert actions.count("suppression.add") == 2
