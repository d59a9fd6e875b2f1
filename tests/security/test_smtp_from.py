"""An app sends only as itself: over SMTP (as over the API) a message has exactly one From
field, at most one Sender, and every address in them, or shown in their display names and
comments, is at one of the app's domains. Tricks that showed another tenant's domain to the
recipient are refused with 550 5.7.1 and a text that says why."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import AcceptError, author_addresses
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.servers import SmtpListener


@pytest.fixture(autouse=True)
def _fast_dkim_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tenancy.generate_dkim_key(1024)
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    tenancy.create_app(store, "other")  # another tenant, with its own domain
    tenancy.add_domain(store, "other", "other.test")
    return app


@pytest.fixture
def listener(settings: Settings, store: Store) -> Iterator[SmtpListener]:
    with SmtpListener(settings, store) as server:
        yield server


def submit(server: SmtpListener, app: tenancy.NewApp, head: str) -> tuple[int, str]:
    """The reply to a message with header lines `head` (plus To and Subject)."""
    raw = f"{head}To: alice@dest.test\r\nSubject: Your order\r\n\r\nShipped.\r\n".encode()
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        try:
            client.sendmail("orders@shop.test", ["alice@dest.test"], raw)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


FORGED = {
    "a second From": "From: orders@shop.test\r\nFrom: CEO <ceo@other.test>\r\n",
    "a second address": "From: orders@shop.test, CEO <ceo@other.test>\r\n",
    "an address in a comment": "From: ceo@other.test (orders@shop.test)\r\n",
    "a comment after": "From: orders@shop.test (ceo@other.test)\r\n",
    "an address as a display name": 'From: "ceo@other.test" <orders@shop.test>\r\n',
    "an encoded display name": "From: =?utf-8?q?ceo=40other.test?= <orders@shop.test>\r\n",
    "the address quoted": 'From: "orders@shop.test" <ceo@other.test>\r\n',
    "two bare addresses": "From: orders@shop.test <ceo@other.test>\r\n",
    "a stray parenthesis": "From: orders@shop.test)<ceo@other.test>\r\n",
    "a foreign Sender": "From: orders@shop.test\r\nSender: ceo@other.test\r\n",
    "two Senders": "From: orders@shop.test\r\nSender: a@shop.test\r\nSender: b@shop.test\r\n",
    "a folded second address": "From: orders@shop.test,\r\n CEO <ceo@other.test>\r\n",
}


@pytest.mark.parametrize("trick", sorted(FORGED))
def test_a_from_that_shows_another_domain_is_refused(
    listener: SmtpListener, shop: tenancy.NewApp, store: Store, trick: str
) -> None:
    code, text = submit(listener, shop, FORGED[trick])
    assert code == 550 and text.startswith("5.7.1 "), (code, text)
    words = ("other.test", "From header fields", "Sender", "malformed")
    assert any(w in text for w in words), text
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar() == 0


def test_plain_and_quoted_froms_of_the_app_are_taken(
    listener: SmtpListener, shop: tenancy.NewApp, store: Store
) -> None:
    for head in (
        "From: Shop <orders@shop.test>\r\n",
        'From: "Shop, Inc." <orders@shop.test>\r\n',
        "From: =?utf-8?q?M=C3=BCller?= <orders@shop.test>\r\n",
        "From: orders@shop.test, Sales <sales@shop.test>\r\nSender: orders@shop.test\r\n",
        "From: Shop <orders@shop.test> (Orders)\r\n",
    ):
        assert submit(listener, shop, head) == (250, ""), head


def test_the_api_and_smtp_share_the_check() -> None:
    """The API builds its From from one `from` address; this is the function that reads it."""
    with pytest.raises(AcceptError) as refused:
        author_addresses([b"From: a@shop.test\r\n", b"From: b@shop.test\r\n"])
    assert refused.value.smtp.startswith("550 5.7.1") and refused.value.field == "from"
    assert author_addresses([b"From: Shop <a@shop.test>\r\n"]) == ["a@shop.test"]
