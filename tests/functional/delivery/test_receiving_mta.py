"""A real Postfix as the receiving MX of dest.test takes Postbode's mail over TLS into a maildir."""

from __future__ import annotations

import errno
import random
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import dkim
import dns.resolver
import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import attempts, deliveries
from postbode.testing.dns import LoopbackDNS
from postbode.testing.postfix import Postfix, receiving_mx_config
from postbode.testing.servers import PostbodeInProcess, send
from postbode.testing.sink import self_signed_certificate

MX_NAME = "mx.dest.test"


def free_loopback_port_25() -> str:
    """A random 127.x.y.z whose port 25 was free a moment ago (Postfix binds it itself)."""
    for _ in range(50):
        host = ".".join(["127", *(str(random.randint(1, 254)) for _ in range(3))])
        with socket.socket() as probe:
            try:
                probe.bind((host, 25))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return host
    raise RuntimeError("no free loopback address for Postfix")


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """One private Postfix per module (it starts in about half a second): the MX of dest.test
    on port 25 of its own loopback address, offering STARTTLS with a self-signed certificate,
    storing every accepted message in the maildir "inbox", and refusing two scripted addresses."""
    host = free_loopback_port_25()
    config = receiving_mx_config(
        ["dest.test"],
        replies={
            "bounce@dest.test": "550 5.1.1 User unknown",
            "defer@dest.test": "451 4.3.0 Try again later",
        },
    )
    instance = Postfix(config=config, host=host, port=25, hostname=MX_NAME)
    cert, key = self_signed_certificate((MX_NAME,))
    instance.root.mkdir(parents=True, exist_ok=True)
    (instance.root / "cert.pem").write_bytes(cert)
    (instance.root / "key.pem").write_bytes(key)
    (instance.root / "key.pem").chmod(0o600)
    instance.config.update(
        {
            # Postfix checks inet_interfaces against the interfaces' own addresses, and lo only
            # has 127.0.0.1; the listener in master.cf binds the test's address all the same.
            "inet_interfaces": "127.0.0.1",
            "smtpd_tls_cert_file": str(instance.root / "cert.pem"),
            "smtpd_tls_key_file": str(instance.root / "key.pem"),
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
    )
    with instance:
        yield instance


@pytest.fixture
def dns_server(postfix: Postfix) -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        server.add_mx("dest.test", [(10, MX_NAME)])
        server.add_a(MX_NAME, postfix.host)
        yield server


@pytest.fixture
def postbode(
    settings: Settings, store: Store, dns_server: LoopbackDNS
) -> Iterator[PostbodeInProcess]:
    settings = settings.model_copy(
        update={"dns_nameservers": dns_server.nameserver, "smtp_hostname": "mta.postbode.test"}
    )
    with PostbodeInProcess(settings, store) as server:
        yield server


def wait_status(store: Store, recipient: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the store (nothing else announces its changes) until the delivery has `status`."""
    deadline = time.monotonic() + timeout
    while True:
        with store.read() as conn:
            row = conn.execute(select(deliveries).where(deliveries.c.recipient == recipient))
            found = row.mappings().first()
        if found is not None and found["status"] == status:
            return dict(found)
        if time.monotonic() > deadline:
            now = found["status"] if found else None
            raise TimeoutError(f"{recipient} not {status} within {timeout}s (is {now})")
        time.sleep(0.02)


def in_maildir(postfix: Postfix, subject: str, timeout: float = 20.0) -> bytes:
    """The stored message with `subject` (the virtual agent writes it just after the 250)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in postfix.mailbox("inbox") if f"\nSubject: {subject}\n".encode() in m]
        if found:
            (message,) = found
            return message
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message {subject!r} in the maildir:\n{postfix.maillog()}")
        time.sleep(0.02)


def test_postfix_accepts_over_tls_into_the_maildir(
    postbode: PostbodeInProcess,
    postfix: Postfix,
    shop: tenancy.NewApp,
    dns_server: LoopbackDNS,
    store: Store,
    request: pytest.FixtureRequest,
) -> None:
    since = postfix.log_position()
    subject = f"Order shipped ({request.node.callspec.id})"
    send(postbode, shop, "alice@dest.test", subject)
    row = wait_status(store, "alice@dest.test", "delivered")

    # Postbode's side: TLS, and Postfix's own 250 with its queue id.
    queued = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", row["last_reply"])
    assert queued, row["last_reply"]
    queue_id = queued.group(1)
    with store.read() as conn:
        attempt = conn.execute(select(attempts)).mappings().one()
    assert attempt["mx_host"] == MX_NAME and attempt["ip"] == postfix.host
    assert attempt["tls_version"] in ("TLSv1.2", "TLSv1.3")

    # Postfix's side: the maillog shows the TLS session and the maildir delivery of that id.
    tls = postfix.wait_for_log(
        r"Anonymous TLS connection established from \S+: (TLSv1\.[23]) with cipher (\S+)",
        since=since,
    )
    assert tls.group(1) == attempt["tls_version"] and tls.group(2) == attempt["tls_cipher"]
    postfix.wait_for_log(
        rf"{queue_id}: to=<alice@dest.test>, relay=virtual, .*status=sent \(delivered to maildir\)",
        since=since,
    )
    assert re.search(rf"{queue_id}: client=\S+\[127\.0\.0\.1\]", postfix.maillog(since))

    # The maildir holds the message, DKIM signature intact through a real MTA.
    stored = in_maildir(postfix, subject)
    assert b"Delivered-To: alice@dest.test\n" in stored
    assert re.search(rb"with ESMTPS id " + queue_id.encode(), stored), "Received says TLS"
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.address[0]]
    resolver.port = dns_server.address[1]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    # Maildir files end lines in LF; DKIM is computed over CRLF.
    assert dkim.verify(stored.replace(b"\n", b"\r\n"), dnsfunc=dnsfunc)


def test_postfix_refusals_bounce_and_defer(
    postbode: PostbodeInProcess, postfix: Postfix, shop: tenancy.NewApp, store: Store
) -> None:
    send(postbode, shop, "bounce@dest.test", "Refused")
    send(postbode, shop, "defer@dest.test", "Later")
    bounced = wait_status(store, "bounce@dest.test", "bounced")
    deferred = wait_status(store, "defer@dest.test", "deferred")
    # Postfix's own wording of the access-table answers, as the MX sent them.
    assert bounced["last_reply"] == (
        "550 5.1.1 <bounce@dest.test>: Recipient address rejected: User unknown"
    )
    assert (bounced["bounce_category"], bounced["hard"]) == ("user_unknown", True)
    assert deferred["last_reply"] == (
        "451 4.3.0 <defer@dest.test>: Recipient address rejected: Try again later"
    )
    stored = postfix.mailbox("inbox")
    assert not [m for m in stored if b"\nSubject: Refused\n" in m or b"\nSubject: Later\n" in m]
