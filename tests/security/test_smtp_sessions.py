"""Limits on mail without AUTH at the SMTP listener: its own message size, refused as it
streams in (and when declared with SIZE), and caps on sessions per client address and in all,
which apps that authenticate never meet."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postbode import tenancy
from postbode.bounces.intake import BounceIntake
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.servers import SmtpListener

RETURN = "return.postbode.localhost"
LIMIT = 64 * 1024


@pytest.fixture
def settings(sqlite_store: Store, tmp_path: Path) -> Settings:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        secret_key="test-secret-key",
        smtp_max_unauthenticated_message_size=LIMIT,
        smtp_max_unauthenticated_sessions=3,
        smtp_max_unauthenticated_sessions_per_ip=2,
    )


@pytest.fixture
def listener(settings: Settings, sqlite_store: Store) -> Iterator[SmtpListener]:
    with SmtpListener(settings, sqlite_store, [BounceIntake(settings, sqlite_store)]) as server:
        yield server


def stranger(server: SmtpListener, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP(timeout=30, source_address=(source, 0))
    client.connect(server.host, server.port)
    client.ehlo("mx.stranger.test")
    return client


def begin(client: smtplib.SMTP) -> tuple[int, bytes]:
    """MAIL and RCPT for a bounce to the return path; the first refusal, or (250, …)."""
    code, text = client.mail("<>")
    if code == 250:
        code, text = client.rcpt(f"postmaster@{RETURN}")
    return code, text


def test_a_message_past_the_limit_without_auth_is_refused_and_the_session_goes_on(
    listener: SmtpListener,
) -> None:
    with contextlib.closing(stranger(listener)) as client:
        assert begin(client)[0] == 250
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"a" * 998 + b"\r\n") * (LIMIT // 500))
        assert code == 552 and text.startswith(b"5.3.4 Message too big"), text
        # Within the limit, the same session goes on.
        assert begin(client)[0] == 250
        assert client.data(b"Subject: small\r\n\r\nhi\r\n")[0] == 250
        # Declared too big with SIZE (RFC 1870): refused before any data.
        code, text = client.mail("<>", [f"SIZE={LIMIT + 1}"])
        assert (code, text[:5]) == (552, b"5.3.4")


def test_the_limit_is_apps_own_once_authenticated(
    listener: SmtpListener, sqlite_store: Store
) -> None:
    app = tenancy.create_app(sqlite_store, "shop")
    tenancy.add_domain(sqlite_store, "shop", "shop.test")
    body = b"Subject: report\r\n\r\n" + (b"b" * 998 + b"\r\n") * (4 * LIMIT // 1000)
    with smtplib.SMTP(listener.host, listener.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        message = b"From: orders@shop.test\r\nTo: a@dest.test\r\n" + body
        assert client.sendmail("orders@shop.test", ["a@dest.test"], message) == {}


def wait_admitted(server: SmtpListener, source: str) -> smtplib.SMTP:
    """A new session from `source` that the caps let begin (a closed session frees its place
    once the server has seen it close)."""
    deadline = time.monotonic() + 10
    while True:
        client = stranger(server, source)
        code, _ = begin(client)
        if code == 250:
            return client
        client.close()
        assert code == 421 and time.monotonic() < deadline
        time.sleep(0.05)


def test_sessions_without_auth_are_capped_per_address_and_in_all(
    listener: SmtpListener, sqlite_store: Store
) -> None:
    first, second = stranger(listener), stranger(listener)
    assert begin(first)[0] == 250 and begin(second)[0] == 250
    # A third from the same address: 421 4.7.0, and the server hangs up (RFC 5321 §3.8).
    third = stranger(listener)
    code, text = begin(third)
    assert (code, text[:5]) == (421, b"4.7.0")
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        third.noop()
    third.close()
    # Another address still gets in, up to the cap in all.
    other = stranger(listener, "127.0.0.2")
    assert begin(other)[0] == 250
    fourth = stranger(listener, "127.0.0.3")
    assert begin(fourth)[0] == 421
    fourth.close()
    # An app that authenticates is not counted, nor turned away.
    app = tenancy.create_app(sqlite_store, "shop")
    with smtplib.SMTP(listener.host, listener.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        assert client.mail("orders@shop.test")[0] == 250
    # A session that ends gives its place back.
    second.quit()
    replacement = wait_admitted(listener, "127.0.0.1")
    for client in (first, other, replacement):
        client.quit()


def test_idle_connections_are_not_counted(listener: SmtpListener) -> None:
    """Only a mail transaction takes a place: connections that only greet do not."""
    idle = [socket.create_connection((listener.host, listener.port)) for _ in range(5)]
    try:
        client = stranger(listener)
        assert begin(client)[0] == 250
        client.quit()
    finally:
        for s in idle:
            s.close()
