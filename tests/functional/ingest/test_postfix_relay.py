"""A real Postfix relays an app's mail into Postbode: relayhost, STARTTLS, SMTP AUTH."""

from __future__ import annotations

import re
import smtplib
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages, raw_messages
from postbode.testing.postfix import Postfix, relay_config, require_postfix
from postbode.testing.servers import SmtpListener

POSTFIX_HOSTNAME = "mta.shop.test"


@pytest.fixture(scope="session")
def postfix_instance() -> Iterator[Postfix]:
    """One Postfix per test session (per xdist worker): start-up is the slow part."""
    require_postfix()  # CI installs Postfix: a missing one is an error, not a skip
    with Postfix(hostname=POSTFIX_HOSTNAME) as instance:
        yield instance


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return created


@pytest.fixture
def listener(settings: Settings, store: Store) -> Iterator[SmtpListener]:
    with SmtpListener(settings, store) as server:
        yield server


@pytest.fixture
def postfix(
    postfix_instance: Postfix, listener: SmtpListener, shop: tenancy.NewApp
) -> Iterator[Postfix]:
    """The session's Postfix, relaying to this test's listener with the shop's SMTP login."""
    postfix_instance.purge()  # nothing left over from an earlier test may reach this store
    postfix_instance.configure(
        relay_config(listener.host, listener.port, shop.smtp_username, shop.smtp_password),
        replace=True,
    )
    yield postfix_instance
    postfix_instance.purge()
    # Restart Postfix's daemons, so that no SMTP session of theirs outlives the listener.
    postfix_instance.reload()
    wait_closed(listener.port)


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until no server-side TCP connection on `port` is open (ESTABLISHED or
    CLOSE_WAIT in /proc/net/tcp): the listener has seen every client go."""
    deadline = time.monotonic() + timeout
    while True:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
        open_here = [
            r
            for r in rows
            if int(r.split()[1].split(":")[1], 16) == port and r.split()[3] in ("01", "08")
        ]
        if not open_here:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"connections to the listener still open after {timeout}s: {open_here}")
        time.sleep(0.01)


def wait_for_messages(store: Store, postfix: Postfix, count: int, timeout: float = 20.0) -> None:
    """Poll the store until it holds `count` messages (Postfix delivers asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        with store.read() as conn:
            stored = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        if stored >= count:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{stored} of {count} messages stored after {timeout}s:\n{postfix.maillog()}"
            )
        time.sleep(0.02)


def stored(store: Store) -> tuple[Any, bytes, list[tuple[str, str]], Counter[str]]:
    """(the one message row, its raw bytes, (recipient, status) pairs, event type counts)."""
    with store.read() as conn:
        message = conn.execute(select(messages)).mappings().one()
        raw = conn.execute(select(raw_messages.c.data)).scalar_one()
        rcpts = conn.execute(
            select(deliveries.c.recipient, deliveries.c.status).where(
                deliveries.c.message_id == message["id"]
            )
        ).all()
        types = Counter(conn.execute(select(events.c.type)).scalars())
    return message, zlib.decompress(raw), sorted((r, s) for r, s in rcpts), types


def test_sendmail_through_postfix_lands_in_postbode(
    postfix: Postfix, listener: SmtpListener, shop: tenancy.NewApp, store: Store
) -> None:
    since = postfix.log_position()
    body = (
        b"From: Shop <orders@shop.test>\n"
        b"To: alice@dest.test, bob@dest.test\n"
        b"Subject: Your order via Postfix\n"
        b"\n"
        b"Thanks for your order.\n"
    )
    postfix.sendmail("orders@shop.test", ["alice@dest.test", "bob@dest.test"], body)

    wait_for_messages(store, postfix, 1)
    postfix.wait_queue_empty()
    message, raw, rcpts, types = stored(store)
    assert message["app_id"] == shop.app_id and message["source"] == "smtp"
    assert message["mail_from"] == "orders@shop.test"
    assert message["subject"] == "Your order via Postfix"
    assert rcpts == [("alice@dest.test", "queued"), ("bob@dest.test", "queued")]
    assert types == {"message.received": 1, "delivery.queued": 2}
    # Postbode's Received line names Postfix as its client; Postfix's own line follows it.
    assert raw.startswith(f"Received: from {POSTFIX_HOSTNAME} (127.0.0.1)".encode())
    assert f"by {POSTFIX_HOSTNAME} (Postfix".encode() in raw
    assert raw.endswith(b"\r\n\r\nThanks for your order.\r\n")

    log = postfix.maillog(since)
    relay = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{listener.port}"
    # encrypt: STARTTLS was required and done; the self-signed certificate was not verified
    assert re.search(rf"Untrusted TLS connection established to {relay}", log), log
    sent = re.findall(
        rf"to=<(\S+)>, relay={relay}, .*status=sent \(250 2\.0\.0 Ok: queued as (\S+)\)", log
    )
    assert sorted(sent) == [
        ("alice@dest.test", str(message["id"])),
        ("bob@dest.test", str(message["id"])),
    ]


def test_smtp_client_of_postfix_relays_8bit_mail_with_control_headers(
    postfix: Postfix, store: Store
) -> None:
    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = "carol@dest.test"
    msg["Subject"] = "Bestelling ontvangen"
    msg["X-Postbode-Tag"] = "order-confirmation"
    msg["X-Postbode-Metadata-Order"] = "A-1001"
    msg.set_content("Dank je wel, één bestelling: €12,50.\n", cte="8bit")
    with smtplib.SMTP(postfix.host, postfix.port, local_hostname="cms.shop.test") as client:
        assert client.send_message(msg) == {}

    wait_for_messages(store, postfix, 1)
    message, raw, rcpts, types = stored(store)
    assert message["tag"] == "order-confirmation"
    assert message["metadata"] == {"order": "A-1001"}
    assert rcpts == [("carol@dest.test", "queued")]
    assert types == {"message.received": 1, "delivery.queued": 1}
    assert "Dank je wel, één bestelling: €12,50.".encode() in raw  # 8-bit, unchanged
    assert b"x-postbode-" not in raw.lower()  # control headers became fields, not headers


def test_wrong_password_keeps_mail_queued_in_postfix_until_fixed(
    postfix: Postfix, listener: SmtpListener, shop: tenancy.NewApp, store: Store
) -> None:
    since = postfix.log_position()
    postfix.configure(
        relay_config(listener.host, listener.port, shop.smtp_username, "not-the-password")
        # no retry of its own before the test flushes: the listener throttles failed logins
        | {"minimal_backoff_time": "300s", "maximal_backoff_time": "300s"},
        replace=True,
    )
    postfix.sendmail(
        "orders@shop.test",
        ["dave@dest.test"],
        b"From: orders@shop.test\nTo: dave@dest.test\nSubject: Retry me\n\nhi\n",
    )
    postfix.wait_for_log(
        r"SASL authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\] said: "
        r"535 5\.7\.8 Authentication credentials invalid",
        since=since,
    )
    postfix.wait_for_log(r"to=<dave@dest\.test>, .*status=deferred", since=since)
    queued = postfix.queue()
    assert [q["recipients"][0]["address"] for q in queued] == ["dave@dest.test"]
    with store.read() as conn:
        assert conn.execute(select(messages.c.id)).first() is None  # 535: nothing was kept

    postfix.configure(
        relay_config(listener.host, listener.port, shop.smtp_username, shop.smtp_password),
        replace=True,
    )
    postfix.flush()
    wait_for_messages(store, postfix, 1)
    postfix.wait_queue_empty()
    message, _, rcpts, _ = stored(store)
    assert message["subject"] == "Retry me"
    assert rcpts == [("dave@dest.test", "queued")]


def test_postbode_refusal_becomes_a_postfix_bounce(postfix: Postfix, store: Store) -> None:
    since = postfix.log_position()
    postfix.sendmail(
        "news@blog.test",
        ["erin@dest.test"],
        b"From: news@blog.test\nTo: erin@dest.test\nSubject: Not ours\n\nhi\n",
    )
    postfix.wait_for_log(
        r"to=<erin@dest\.test>, .*dsn=5\.7\.1, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] "
        r"said: 550 5\.7\.1 sender domain 'blog\.test' is not a domain of this app",
        since=since,
    )
    with store.read() as conn:
        assert conn.execute(select(messages.c.id)).first() is None
