"""Postmark's official Python client (postmarker) and django-anymail's Postmark backend send
through Postbode with only the base URL and the key changed."""

from __future__ import annotations

import base64

import pytest
from django.core.mail import EmailMultiAlternatives
from django.test import override_settings
from postmarker.core import PostmarkClient
from postmarker.exceptions import ClientError

from postbode import tenancy
from postbode.store.engine import Store
from postbode.templates import manage
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import SmtpSink

from .conftest import parts, stored

PDF = b"%PDF-1.4 invoice 12\n"
PNG = b"\x89PNG\r\n\x1a\n logo"


def client(postbode: HttpPostbode, token: str) -> PostmarkClient:
    # postmarker joins its absolute paths onto the base URL: Postbode answers at the root.
    return PostmarkClient(server_token=token, root_api_url=postbode.http_url + "/")


def test_postmarker_sends_with_tag_metadata_attachments_and_headers(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    answer = client(postbode, shop.api_key).emails.send(
        From="Shop <orders@shop.test>",
        To="Alice <alice@dest.test>",
        Cc="bob@dest.test",
        Subject="Your order 12",
        TextBody="Thanks for your order.",
        HtmlBody='<p>Thanks <img src="cid:logo.png"></p>',
        ReplyTo="help@shop.test",
        Tag="order-confirmation",
        Metadata={"order": "12", "customer": "c-7"},
        Headers={"X-Order": "12"},
        TrackOpens=False,
        TrackLinks="None",
        Attachments=[
            {
                "Name": "invoice.pdf",
                "Content": base64.b64encode(PDF).decode(),
                "ContentType": "application/pdf",
            },
            {
                "Name": "logo.png",
                "Content": base64.b64encode(PNG).decode(),
                "ContentType": "image/png",
                "ContentID": "cid:logo.png",
            },
        ],
    )
    assert answer["ErrorCode"] == 0 and answer["Message"] == "OK"
    row = stored(store, answer["MessageID"])
    assert row.tag == "order-confirmation"
    assert row.metadata == {"order": "12", "customer": "c-7"}
    assert row.stream == "transactional"
    mx_sink.wait_until_sync(
        lambda s: (
            {r for m in s.messages for r in m.rcpt_tos} == {"alice@dest.test", "bob@dest.test"}
        ),
        30,
        "both recipients",
    )
    received = mx_sink.messages[0]
    msg = received.message
    assert msg["X-Order"] == "12"
    assert msg["Reply-To"] == "help@shop.test"
    assert msg["Subject"] == "Your order 12"
    found = parts(received)
    assert found["text"].strip() == "Thanks for your order."
    assert found["attachments"]["invoice.pdf"][:3] == ("application/pdf", PDF, "attachment")
    assert found["attachments"]["logo.png"] == ("image/png", PNG, "inline", "<logo.png>")


def test_postmarker_batch_answers_each_message(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    answers = client(postbode, shop.api_key).emails.send_batch(
        {"From": "orders@shop.test", "To": "a@dest.test", "Subject": "A", "TextBody": "a"},
        {"From": "orders@shop.test", "To": "b@dest.test", "Subject": "B", "TextBody": "b"},
    )
    assert [a["ErrorCode"] for a in answers] == [0, 0]
    assert {a["To"] for a in answers} == {"a@dest.test", "b@dest.test"}
    assert len({a["MessageID"] for a in answers}) == 2
    mx_sink.wait_for_sync(2, timeout=30)


def test_postmarker_sees_postmarks_errors(postbode: HttpPostbode, shop: tenancy.NewApp) -> None:
    with pytest.raises(ClientError) as bad_key:
        client(postbode, "pb_nope_nope").emails.send(
            From="orders@shop.test", To="a@dest.test", Subject="x", TextBody="x"
        )
    assert bad_key.value.error_code == 10
    with pytest.raises(ClientError) as foreign:
        client(postbode, shop.api_key).emails.send(
            From="orders@elsewhere.test", To="a@dest.test", Subject="x", TextBody="x"
        )
    assert foreign.value.error_code == 400
    assert "Sender Signature" in str(foreign.value)
    with pytest.raises(ClientError) as nobody:
        client(postbode, shop.api_key).emails.send(
            From="orders@shop.test", Subject="x", TextBody="x"
        )
    assert nobody.value.error_code == 300
    assert "Zero recipients" in str(nobody.value)


def anymail_settings(postbode: HttpPostbode, token: str) -> override_settings:
    return override_settings(
        EMAIL_BACKEND="anymail.backends.postmark.EmailBackend",
        ANYMAIL={"POSTMARK_SERVER_TOKEN": token, "POSTMARK_API_URL": postbode.http_url + "/"},
    )


def test_anymail_postmark_backend_sends(
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
        msg.attach_alternative("<p>Thanks</p>", "text/html")
        msg.attach("invoice.pdf", PDF, "application/pdf")
        msg.tags = ["order-confirmation"]  # type: ignore[attr-defined]
        msg.metadata = {"order": "12"}  # type: ignore[attr-defined]
        assert msg.send() == 1
    status = msg.anymail_status  # type: ignore[attr-defined]
    assert status.status == {"sent"}
    row = stored(store, status.message_id)
    assert (row.tag, row.metadata) == ("order-confirmation", {"order": "12"})
    received = mx_sink.wait_for_sync(1, timeout=30)[0]
    assert received.message["X-Order"] == "12"
    assert parts(received)["attachments"]["invoice.pdf"][1] == PDF


def test_anymail_postmark_backend_sees_errors(postbode: HttpPostbode, shop: tenancy.NewApp) -> None:
    from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused

    with anymail_settings(postbode, "pb_wrong_key"), pytest.raises(AnymailAPIError) as bad:
        EmailMultiAlternatives("x", "x", "orders@shop.test", ["a@dest.test"]).send()
    assert bad.value.status_code == 401
    with anymail_settings(postbode, shop.api_key), pytest.raises(AnymailAPIError) as foreign:
        EmailMultiAlternatives("x", "x", "orders@elsewhere.test", ["a@dest.test"]).send()
    assert "Sender Signature" in str(foreign.value)
    with anymail_settings(postbode, shop.api_key), pytest.raises(AnymailRecipientsRefused):
        EmailMultiAlternatives("x", "x", "orders@shop.test", ["alice@-dest.test"]).send()


def test_postmarker_sends_with_templates(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    created = manage.create_template(
        store, shop.app_id, "receipt", subject="Receipt {{ n }}", html="<p>{{ who }}</p>"
    )
    postmark = client(postbode, shop.api_key)
    by_alias = postmark.emails.send_with_template(
        TemplateAlias="receipt",
        TemplateModel={"n": 1, "who": "<Ann>"},
        From="orders@shop.test",
        To="ann@dest.test",
    )
    assert by_alias["ErrorCode"] == 0
    by_id = postmark.emails.send_with_template(
        TemplateId=created["id"],
        TemplateModel={"n": 2, "who": "Bob"},
        From="orders@shop.test",
        To="bob@dest.test",
    )
    assert by_id["ErrorCode"] == 0
    batch = postmark.emails.send_template_batch(
        {
            "TemplateAlias": "receipt",
            "TemplateModel": {"n": 3, "who": "Cy"},
            "From": "orders@shop.test",
            "To": "cy@dest.test",
        },
        {
            "TemplateAlias": "nope",
            "TemplateModel": {},
            "From": "orders@shop.test",
            "To": "dee@dest.test",
        },
    )
    assert [r["ErrorCode"] for r in batch] == [0, 300]
    received = {m.rcpt_tos[0]: m.message for m in mx_sink.wait_for_sync(3, timeout=30)}
    assert received["ann@dest.test"]["Subject"] == "Receipt 1"
    assert "&lt;Ann&gt;" in received["ann@dest.test"].get_body(("html",)).get_content()
    assert received["bob@dest.test"]["Subject"] == "Receipt 2"
    assert received["cy@dest.test"]["Subject"] == "Receipt 3"
    assert stored(store, by_alias["MessageID"]).template == "receipt"
