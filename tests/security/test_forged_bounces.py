"""A stranger cannot bounce or suppress someone else's address: every recipient of a message sees
its Message-ID, so a report sent without AUTH to a bare return-path address that names a
co-recipient and that Message-ID is only noted. Only the delivery's own VERP token (the
address a report is sent to, or the Return-Path of the original a feedback loop returns)
bounces a delivery or suppresses its address."""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.bounces.intake import BounceIntake
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages, suppressions
from postbode.testing.factories import make_queued_message
from postbode.testing.servers import SmtpListener

RETURN = "return.postbode.localhost"


@pytest.fixture
def listener(settings: Settings, store: Store) -> Iterator[SmtpListener]:
    with SmtpListener(settings, store, [BounceIntake(settings, store)]) as server:
        yield server


@pytest.fixture
def sent(store: Store) -> tuple[str, dict[str, tuple[uuid.UUID, str]]]:
    """One message delivered to bob and carol: its Message-ID, and per recipient the delivery
    and its VERP token."""
    app = tenancy.create_app(store, "shop")
    message_id, _ = make_queued_message(store, app.app_id, ["bob@dest.test", "carol@dest.test"])
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.message_id == message_id)
            .values(status="delivered", attempts=1)
        )
        mid = conn.execute(
            select(messages.c.message_id_header).where(messages.c.id == message_id)
        ).scalar_one()
        rows = conn.execute(
            select(deliveries.c.recipient, deliveries.c.id, deliveries.c.verp_token)
        ).all()
    return mid, {r.recipient: (r.id, r.verp_token) for r in rows}


def dsn(recipient: str, mid: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.dest.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; "
        'boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n'
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n"
        f"\r\nFinal-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: orders@shop.test\r\nTo: bob@dest.test, {recipient}\r\nMessage-ID: {mid}\r\n"
        "\r\n--B--\r\n"
    ).encode()


def arf(recipient: str, mid: str, return_path: str | None = None) -> bytes:
    returned = f"Return-Path: <{return_path}>\r\n" if return_path else ""
    return (
        "From: fbl@isp.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n'
        "\r\n--A\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: abuse\r\nVersion: 1\r\nOriginal-Rcpt-To: <{recipient}>\r\n"
        "\r\n--A\r\nContent-Type: message/rfc822\r\n\r\n"
        f"{returned}From: orders@shop.test\r\nTo: {recipient}\r\nMessage-ID: {mid}\r\n"
        "\r\nHi\r\n--A--\r\n"
    ).encode()


def report(server: SmtpListener, rcpt: str, data: bytes) -> tuple[int, str]:
    """Sent as a stranger: no AUTH, from <>."""
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.ehlo("mx.stranger.test")
        assert client.mail("<>")[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
    return code, text.decode()


def state(store: Store) -> tuple[dict[str, str], list[str], list[str]]:
    with store.read() as conn:
        status = {
            r.recipient: r.status
            for r in conn.execute(select(deliveries.c.recipient, deliveries.c.status))
        }
        suppressed = sorted(conn.execute(select(suppressions.c.email)).scalars())
        kinds = sorted(conn.execute(select(events.c.type)).scalars())
    return status, suppressed, kinds


def test_a_forged_report_naming_a_co_recipient_and_the_message_id_changes_nothing(
    listener: SmtpListener, store: Store, sent: tuple[str, dict[str, tuple[uuid.UUID, str]]]
) -> None:
    mid, _ = sent
    for local in ("postmaster", "bounces"):
        code, text = report(listener, f"{local}@{RETURN}", dsn("carol@dest.test", mid))
        assert code == 250 and "noted" in text and "changes nothing" in text
    code, text = report(listener, f"abuse@{RETURN}", arf("carol@dest.test", mid))
    assert code == 250 and "noted" in text
    # Nor does a Return-Path of ours that is no token.
    code, text = report(listener, f"abuse@{RETURN}", arf("carol@dest.test", mid, f"x@{RETURN}"))
    assert "noted" in text
    assert state(store) == ({"bob@dest.test": "delivered", "carol@dest.test": "delivered"}, [], [])


def test_the_verp_token_still_bounces_and_a_feedback_loop_still_suppresses(
    listener: SmtpListener, store: Store, sent: tuple[str, dict[str, tuple[uuid.UUID, str]]]
) -> None:
    mid, tokens = sent
    carol_token = tokens["carol@dest.test"][1]
    code, text = report(listener, f"{carol_token}@{RETURN}", dsn("carol@dest.test", mid))
    assert (code, text) == (250, "2.0.0 Ok: bounce recorded")
    # A feedback loop sends to abuse@ and returns the message as delivered: its Return-Path
    # is bob's own VERP address.
    bob_path = f"{tokens['bob@dest.test'][1]}@{RETURN}"
    code, text = report(listener, f"abuse@{RETURN}", arf("bob@dest.test", mid, bob_path))
    assert (code, text) == (250, "2.0.0 Ok: complaint recorded")
    status, suppressed, kinds = state(store)
    assert status == {"bob@dest.test": "delivered", "carol@dest.test": "bounced"}
    assert suppressed == ["bob@dest.test", "carol@dest.test"]
    assert kinds == ["delivery.bounced", "message.complained"]
