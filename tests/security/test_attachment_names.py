"""Attachment file names reach the recipient safe to show and to save, from the API and from
SMTP: no directory climbing, no path separators, no control characters, no bidi overrides
that make "invoice\u202efdp.exe" read as "invoiceexe.pdf"."""

from __future__ import annotations

import base64
import email
import smtplib
import zlib
from email.message import EmailMessage
from email.policy import SMTP, default

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.ingest.mime import display_filename, safe_attachment_names
from postbode.store.engine import Store
from postbode.store.schema import raw_messages
from postbode.testing.servers import SmtpListener
from postbode.web.app import create_app

HOSTILE = {
    "../../etc/passwd": "passwd",
    "..\\..\\Windows\\system32\\evil.dll": "evil.dll",
    "/etc/shadow": "shadow",
    "invoice\u202efdp.exe": "invoicefdp.exe",
    "report\u2066\u2069\u200f.pdf": "report.pdf",
    "a\x00b\x07c\x1b[31m.txt": "abc[31m.txt",
    "..": "attachment",
    "   .hidden  name.txt ": "hidden name.txt",
    "\u202e": "attachment",
    "Résumé 2024.pdf": "Résumé 2024.pdf",
    "x" * 300 + ".txt": "x" * 255,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_display_filename(name: str) -> None:
    assert display_filename(name) == HOSTILE[name]


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tenancy.generate_dkim_key(1024)
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return app


def stored_names(store: Store) -> list[str | None]:
    with store.read() as conn:
        (data,) = conn.execute(select(raw_messages.c.data)).scalars().all()
    msg = email.message_from_bytes(zlib.decompress(data), policy=default)
    return [part.get_filename() for part in msg.iter_attachments()]  # type: ignore[attr-defined]


NAMES = ["../../etc/passwd", "invoice\u202efdp.exe", "..\\..\\boot.ini", "plain.pdf"]
SAFE = ["passwd", "invoicefdp.exe", "boot.ini", "plain.pdf"]


def test_file_names_over_smtp_are_made_safe(
    settings: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "orders@shop.test", "alice@dest.test", "Invoice"
    msg.set_content("Attached.")
    for name in NAMES:
        msg.add_attachment(b"%PDF-1.4", "application", "pdf", filename=name)
    raw = msg.as_bytes(policy=SMTP)
    # Also a name written by hand, as RFC 2047 words in a Content-Type name parameter.
    raw = raw.replace(
        b'filename="plain.pdf"',
        b'filename="=?utf-8?b?' + base64.b64encode("a/b\u202e.pdf".encode()) + b'?="',
    )
    with SmtpListener(settings, store) as server, smtplib.SMTP(server.host, server.port) as c:
        c.login(shop.smtp_username, shop.smtp_password)
        c.sendmail("orders@shop.test", ["alice@dest.test"], raw)
    assert stored_names(store) == [*SAFE[:3], "b.pdf"]


def test_file_names_from_the_api_are_made_safe(
    settings: Settings, store: Store, shop: tenancy.NewApp
) -> None:
    acceptor = Acceptor(store, settings.smtp_hostname, allow_unverified=True)
    with TestClient(create_app(settings, store, acceptor)) as client:
        answer = client.post(
            "/api/v1/messages",
            headers={"Authorization": f"Bearer {shop.api_key}"},
            json={
                "from": "orders@shop.test",
                "to": ["alice@dest.test"],
                "subject": "Invoice",
                "text": "Attached.",
                "attachments": [
                    {"filename": name, "content": base64.b64encode(b"%PDF").decode()}
                    for name in NAMES
                ],
            },
        )
        assert client.portal is not None
        client.portal.call(acceptor.close)
    assert answer.status_code == 202, answer.text
    assert stored_names(store) == SAFE


def test_a_message_with_safe_names_is_left_as_it_was() -> None:
    raw = (
        b"From: a@shop.test\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b'Content-Type: application/pdf; name="x.pdf"\r\n'
        b'Content-Disposition: attachment;\r\n filename="x.pdf"\r\n\r\nAAAA\r\n--B--\r\n'
    )
    assert safe_attachment_names(raw) is raw
