"""SMTP submission against the real listener: smtplib and swaks, TLS, AUTH, relay policy."""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages
from postbode.testing.servers import SmtpListener


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return created


@pytest.fixture
def listener(settings: Settings, store: Store) -> Iterator[SmtpListener]:
    with SmtpListener(settings, store) as server:
        yield server


def tls_client() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the listener's certificate is self-signed
    return context


def message(sender: str = "orders@shop.test", to: str = "alice@dest.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "Your order"
    msg.set_content("Thanks for your order.")
    return msg


def test_smtplib_starttls_auth_send(
    listener: SmtpListener, shop: tenancy.NewApp, store: Store
) -> None:
    with smtplib.SMTP(listener.host, listener.port) as client:
        code, ehlo = client.ehlo("cms.shop.test")
        assert code == 250
        for ext in (
            b"PIPELINING",
            b"SIZE 26214400",
            b"8BITMIME",
            b"SMTPUTF8",
            b"ENHANCEDSTATUSCODES",
            b"STARTTLS",
        ):
            assert ext in ehlo
        client.starttls(context=tls_client())
        client.ehlo("cms.shop.test")
        client.login(shop.smtp_username, shop.smtp_password)
        refused = client.send_message(message(), to_addrs=["alice@dest.test", "bob@dest.test"])
        assert refused == {}
    with store.read() as conn:
        msg = conn.execute(select(messages)).mappings().one()
        rcpts = conn.execute(select(deliveries.c.recipient, deliveries.c.status)).all()
        types = Counter(conn.execute(select(events.c.type)).scalars())
    assert msg["app_id"] == shop.app_id and msg["source"] == "smtp"
    assert msg["subject"] == "Your order"
    assert sorted(rcpts) == [("alice@dest.test", "queued"), ("bob@dest.test", "queued")]
    assert types == {"message.received": 1, "delivery.queued": 2}


def test_replies_carry_enhanced_status_codes(listener: SmtpListener, shop: tenancy.NewApp) -> None:
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.ehlo("x.test")
        code, text = client.docmd("DATA")
        assert code == 503 and text.startswith(b"5.5.1")
        client.login(shop.smtp_username, shop.smtp_password)
        code, text = client.docmd("MAIL", "FROM:<orders@shop.test>")
        assert (code, text[:5]) == (250, b"2.1.0")
        code, text = client.docmd("RCPT", "TO:<a@dest.test>")
        assert (code, text[:5]) == (250, b"2.1.5")
        code, text = client.docmd("RSET")
        assert (code, text[:5]) == (250, b"2.0.0")


def test_a_mail_transaction_is_on_its_way_until_its_message_or_its_end(
    listener: SmtpListener, shop: tenancy.NewApp
) -> None:
    """A group commit waits a moment for messages on their way (ingest/accept.py): a session
    counts from its MAIL until it hands its message over or the transaction ends otherwise."""
    acceptor = listener.acceptor
    assert acceptor is not None

    def begin(client: smtplib.SMTP) -> None:
        assert client.docmd("MAIL", "FROM:<orders@shop.test>")[0] == 250
        assert acceptor.on_their_way == 1

    with smtplib.SMTP(listener.host, listener.port) as client:
        client.login(shop.smtp_username, shop.smtp_password)
        begin(client)
        client.docmd("RSET")
        assert acceptor.on_their_way == 0
        begin(client)
        client.ehlo("x.test")
        assert acceptor.on_their_way == 0
        begin(client)
        client.docmd("RCPT", "TO:<a@dest.test>")
        client.docmd("DATA")
        client.send(b"From: Shop <orders@shop.test>\r\nSubject: Hi\r\n\r\nHi\r\n.\r\n")
        assert client.getreply()[0] == 250
        assert acceptor.on_their_way == 0
        begin(client)
    # The client left mid-transaction (smtplib's QUIT, then the connection closes).
    for _ in range(100):
        if acceptor.on_their_way == 0:
            break
        time.sleep(0.05)
    assert acceptor.on_their_way == 0


def test_unauthenticated_client_is_no_open_relay(listener: SmtpListener) -> None:
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.ehlo("spammer.test")
        client.mail("someone@elsewhere.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert code == 554 and text.startswith(b"5.7.1 Relaying denied: authenticate")
        code, text = client.docmd("DATA")
        assert code == 503


def test_app_cannot_send_with_another_apps_domain(
    listener: SmtpListener, shop: tenancy.NewApp, store: Store
) -> None:
    tenancy.create_app(store, "blog")
    tenancy.add_domain(store, "blog", "blog.test")
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.starttls(context=tls_client())
        client.login(shop.smtp_username, shop.smtp_password)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.send_message(message(sender="news@blog.test"))
        assert refused.value.smtp_code == 550
        assert refused.value.smtp_error.startswith(b"5.7.1")
    with store.read() as conn:
        assert conn.execute(select(messages.c.id)).first() is None


def test_recipient_cap(listener: SmtpListener, shop: tenancy.NewApp, settings: Settings) -> None:
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.login(shop.smtp_username, shop.smtp_password)
        client.mail("orders@shop.test")
        for i in range(settings.smtp_max_recipients):
            assert client.rcpt(f"r{i}@dest.test")[0] == 250
        code, text = client.rcpt("one-too-many@dest.test")
        assert code == 452 and text.startswith(b"4.5.3")


def test_failed_logins_are_throttled(
    listener: SmtpListener, shop: tenancy.NewApp, settings: Settings
) -> None:
    wrong = base64.b64encode(f"\0{shop.smtp_username}\0wrong".encode()).decode()
    right = base64.b64encode(f"\0{shop.smtp_username}\0{shop.smtp_password}".encode()).decode()
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.ehlo("guess.test")
        for _ in range(settings.smtp_auth_max_failures):
            code, text = client.docmd("AUTH", f"PLAIN {wrong}")
            assert code == 535 and text.startswith(b"5.7.8")
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.ehlo("guess.test")
        # throttled even with the right password: the guesser must not learn it is right
        code, text = client.docmd("AUTH", f"PLAIN {right}")
        assert code == 421 and text.startswith(b"4.7.0")


def test_auth_login_mechanism(listener: SmtpListener, shop: tenancy.NewApp) -> None:
    with smtplib.SMTP(listener.host, listener.port) as client:
        client.ehlo("x.test")
        client.user, client.password = shop.smtp_username, shop.smtp_password
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235


def test_auth_before_tls_is_required_except_on_loopback() -> None:
    """The loopback exemption is decided per connection from the peer address (a remote peer
    cannot connect in a loopback-only test, so the decision is tested on its own)."""
    from postbode.ingest.smtp_server import auth_requires_tls

    assert auth_requires_tls("203.0.113.9", True)
    assert auth_requires_tls("2001:db8::1", True)
    assert not auth_requires_tls("127.0.0.1", True)
    assert not auth_requires_tls("127.31.7.9", True)
    assert not auth_requires_tls("::1", True)
    assert not auth_requires_tls("203.0.113.9", False)


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks not installed (.ci/run installs it)"
)
def test_swaks_starttls_auth(listener: SmtpListener, shop: tenancy.NewApp, store: Store) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"{listener.host}:{listener.port}",
            "-tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            shop.smtp_username,
            "--from",
            "orders@shop.test",
            "--to",
            "carol@dest.test",
            "--header",
            "From: orders@shop.test",
            "--header",
            "Subject: swaks test",
            "--body",
            "hi",
        ],
        # The password at swaks's prompt: on its command line one that begins with "-" (as a
        # random secret may) is read as an option.
        input=shop.smtp_password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with store.read() as conn:
        assert conn.execute(select(messages.c.subject)).scalars().all() == ["swaks test"]
        assert conn.execute(select(deliveries.c.recipient)).scalars().all() == ["carol@dest.test"]
