"""Mailgun's official Python SDK and django-anymail's Mailgun backend send through Postbode
with only the API URL and the key changed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from django.core.mail import EmailMultiAlternatives
from django.test import override_settings
from mailgun.client import Client

from postbode import tenancy
from postbode.store.engine import Store
from postbode.templates import manage
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import SmtpSink

from .conftest import parts, stored_by_header

PDF = b"%PDF-1.4 invoice 12\n"
PNG = b"\x89PNG\r\n\x1a\n logo"


def client(postbode: HttpPostbode, key: str) -> Client:
    return Client(auth=("api", key), api_url=postbode.http_url + "/compat/mailgun")


def order(sender: str = "Shop <orders@shop.test>") -> dict[str, object]:
    return {
        "from": sender,
        "to": ["Alice <alice@dest.test>", "bob@dest.test"],
        "subject": "Your order 12",
        "text": "Thanks for your order.",
        "html": '<p>Thanks <img src="cid:logo.png"></p>',
        "o:tag": "order-confirmation",
        "o:tracking-opens": "yes",
        "o:tracking-clicks": "no",
        "h:X-Order": "12",
        "h:Reply-To": "help@shop.test",
        "v:order": "12",
        "v:customer": "c-7",
    }


def test_mailgun_sdk_sends_with_tag_variables_attachments_and_headers(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    files = [
        ("attachment", ("invoice.pdf", PDF, "application/pdf")),
        ("inline", ("logo.png", PNG, "image/png")),
    ]
    response = client(postbode, shop.api_key).messages.create(
        data=order(), files=files, domain="shop.test"
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["message"] == "Queued. Thank you."
    row = stored_by_header(store, answer["id"])
    assert row.tag == "order-confirmation"
    assert row.metadata == {"order": "12", "customer": "c-7"}
    assert (row.track_opens, row.track_clicks) == (True, False)
    mx_sink.wait_until_sync(
        lambda s: (
            {r for m in s.messages for r in m.rcpt_tos} == {"alice@dest.test", "bob@dest.test"}
        ),
        30,
        "both recipients",
    )
    received = mx_sink.messages[0]
    assert received.message["X-Order"] == "12"
    assert received.message["Reply-To"] == "help@shop.test"
    found = parts(received)
    assert found["attachments"]["invoice.pdf"][:3] == ("application/pdf", PDF, "attachment")
    assert found["attachments"]["logo.png"] == ("image/png", PNG, "inline", "<logo.png>")


def test_templates_with_variables_and_delivery_time(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    manage.create_template(
        store, shop.app_id, "order", subject="Order {{ n }}", text="Total {{ total }}"
    )
    mailgun = client(postbode, shop.api_key).messages
    base = {"from": "orders@shop.test", "to": "alice@dest.test", "template": "order"}
    sent = mailgun.create(
        data={**base, "t:variables": json.dumps({"n": 12, "total": "€ 9"})}, domain="shop.test"
    )
    assert sent.status_code == 200, sent.text
    by_header = mailgun.create(
        data={**base, "to": "bob@dest.test", "h:X-Mailgun-Variables": '{"n": 13, "total": 1}'},
        domain="shop.test",
    )
    assert by_header.status_code == 200, by_header.text
    received = {m.rcpt_tos[0]: m.message for m in mx_sink.wait_for_sync(2, timeout=30)}
    assert received["alice@dest.test"]["Subject"] == "Order 12"
    assert "Total € 9" in received["alice@dest.test"].get_body(("plain",)).get_content()
    assert received["bob@dest.test"]["Subject"] == "Order 13"

    later = mailgun.create(
        data={**base, "o:deliverytime": format_datetime(datetime.now(UTC) + timedelta(days=1))},
        domain="shop.test",
    )
    assert later.status_code == 200, later.text
    assert stored_by_header(store, later.json()["id"]).send_at is not None
    mixed = mailgun.create(data={**base, "subject": "x"}, domain="shop.test")
    assert mixed.status_code == 400 and "from the template" in mixed.json()["message"]


@pytest.mark.parametrize(
    "option",
    [
        {"recipient-variables": '{"alice@dest.test": {"first": "Alice"}}'},
        {"o:testmode": "yes"},
        {"t:version": "v2"},
    ],
)
def test_what_postbode_lacks_is_refused(
    postbode: HttpPostbode, shop: tenancy.NewApp, option: dict[str, str]
) -> None:
    response = client(postbode, shop.api_key).messages.create(
        data={**order(), **option}, domain="shop.test"
    )
    assert response.status_code == 400
    assert "not supported" in response.json()["message"]


def test_mailgun_sdk_sees_mailguns_errors(postbode: HttpPostbode, shop: tenancy.NewApp) -> None:
    bad_key = client(postbode, "pb_nope_nope").messages.create(data=order(), domain="shop.test")
    assert bad_key.status_code == 401
    assert bad_key.json() == {"message": "Invalid private key"}
    other_domain = client(postbode, shop.api_key).messages.create(
        data=order(), domain="elsewhere.test"
    )
    assert other_domain.status_code == 404
    assert other_domain.json() == {"message": "Domain not found: elsewhere.test"}
    foreign = client(postbode, shop.api_key).messages.create(
        data=order("orders@elsewhere.test"), domain="shop.test"
    )
    assert foreign.status_code == 403
    assert foreign.json()["message"].startswith("Domain shop.test is not allowed to send")
    nobody = client(postbode, shop.api_key).messages.create(
        data={k: v for k, v in order().items() if k != "to"}, domain="shop.test"
    )
    assert nobody.status_code == 400
    assert nobody.json() == {"message": "to parameter is missing"}


def anymail_settings(postbode: HttpPostbode, key: str) -> override_settings:
    return override_settings(
        EMAIL_BACKEND="anymail.backends.mailgun.EmailBackend",
        ANYMAIL={
            "MAILGUN_API_KEY": key,
            "MAILGUN_API_URL": postbode.http_url + "/compat/mailgun/v3",
        },
    )


def test_anymail_mailgun_backend_sends(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    with anymail_settings(postbode, shop.api_key):
        msg = EmailMultiAlternatives(
            "Your order 12",
            "Thanks for your order.",
            "Shop <orders@shop.test>",
            ["alice@dest.test"],
            headers={"X-Order": "12"},
        )
        msg.attach("invoice.pdf", PDF, "application/pdf")
        msg.tags = ["order-confirmation"]  # type: ignore[attr-defined]
        msg.metadata = {"order": "12"}  # type: ignore[attr-defined]
        msg.track_clicks = True  # type: ignore[attr-defined]
        assert msg.send() == 1
    status = msg.anymail_status  # type: ignore[attr-defined]
    assert status.status == {"queued"}
    row = stored_by_header(store, status.message_id)
    assert (row.tag, row.metadata, row.track_clicks) == (
        "order-confirmation",
        {"order": "12"},
        True,
    )
    received = mx_sink.wait_for_sync(1, timeout=30)[0]
    assert received.message["X-Order"] == "12"
    assert parts(received)["attachments"]["invoice.pdf"][1] == PDF


def test_anymail_mailgun_backend_sees_errors(postbode: HttpPostbode, shop: tenancy.NewApp) -> None:
    from anymail.exceptions import AnymailAPIError

    with anymail_settings(postbode, "pb_wrong_key"), pytest.raises(AnymailAPIError) as bad:
        EmailMultiAlternatives("x", "x", "orders@shop.test", ["a@dest.test"]).send()
    assert bad.value.status_code == 401
    with anymail_settings(postbode, shop.api_key), pytest.raises(AnymailAPIError) as foreign:
        EmailMultiAlternatives("x", "x", "orders@elsewhere.test", ["a@dest.test"]).send()
    assert foreign.value.status_code == 404  # anymail posts to the From domain's path
