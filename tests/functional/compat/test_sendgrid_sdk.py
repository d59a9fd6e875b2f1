"""SendGrid's official Python library and django-anymail's SendGrid backend send through
Postbode with only the host and the key changed."""

from __future__ import annotations

import base64
import time

import pytest
from django.core.mail import EmailMultiAlternatives
from django.test import override_settings
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Attachment,
    Category,
    ContentId,
    CustomArg,
    Disposition,
    FileContent,
    FileName,
    FileType,
    Header,
    Mail,
)
from sqlalchemy import func, select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import deliveries
from postbode.templates import manage
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import SmtpSink

from .conftest import no_warnings_from_anymail, parts, stored

PDF = b"%PDF-1.4 invoice 12\n"
PNG = b"\x89PNG\r\n\x1a\n logo"


def client(postbode: HttpPostbode, key: str) -> SendGridAPIClient:
    return SendGridAPIClient(api_key=key, host=postbode.http_url + "/compat/sendgrid")


def order_mail(sender: str = "Shop <orders@shop.test>") -> Mail:
    mail = Mail(
        from_email=sender,
        to_emails="Alice <alice@dest.test>",
        subject="Your order 12",
        plain_text_content="Thanks for your order.",
        html_content='<p>Thanks <img src="cid:logo"></p>',
    )
    mail.category = Category("order-confirmation")
    mail.custom_arg = [CustomArg("order", "12"), CustomArg("customer", "c-7")]
    mail.header = Header("X-Order", "12")
    mail.attachment = [
        Attachment(
            FileContent(base64.b64encode(PDF).decode()),
            FileName("invoice.pdf"),
            FileType("application/pdf"),
            Disposition("attachment"),
        ),
        Attachment(
            FileContent(base64.b64encode(PNG).decode()),
            FileName("logo.png"),
            FileType("image/png"),
            Disposition("inline"),
            ContentId("logo"),
        ),
    ]
    return mail


def test_sendgrid_library_sends_with_categories_args_attachments_and_headers(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    response = client(postbode, shop.api_key).send(order_mail())
    assert response.status_code == 202
    message_id = response.headers["X-Message-Id"]
    row = stored(store, message_id)
    assert row.tag == "order-confirmation"
    assert row.metadata == {"order": "12", "customer": "c-7"}
    received = mx_sink.wait_for_sync(1, timeout=30)[0]
    assert received.rcpt_tos == ("alice@dest.test",)
    assert received.message["X-Order"] == "12"
    found = parts(received)
    assert found["text"].strip() == "Thanks for your order."
    assert found["attachments"]["invoice.pdf"][:3] == ("application/pdf", PDF, "attachment")
    assert found["attachments"]["logo.png"] == ("image/png", PNG, "inline", "<logo>")


def test_each_personalization_is_a_message(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    body = {
        "personalizations": [
            {"to": [{"email": "a@dest.test"}], "custom_args": {"n": "1"}},
            {"to": [{"email": "b@dest.test"}], "subject": "For B", "custom_args": {"n": "2"}},
        ],
        "from": {"email": "orders@shop.test", "name": "Shop"},
        "subject": "For everyone",
        "content": [{"type": "text/plain", "value": "hello"}],
        "tracking_settings": {"open_tracking": {"enable": True}},
    }
    response = client(postbode, shop.api_key).client.mail.send.post(request_body=body)
    assert response.status_code == 202
    received = mx_sink.wait_for_sync(2, timeout=30)
    subjects = {m.rcpt_tos[0]: m.message["Subject"] for m in received}
    assert subjects == {"a@dest.test": "For everyone", "b@dest.test": "For B"}
    first = stored(store, response.headers["X-Message-Id"])
    assert first.metadata == {"n": "1"} and first.track_opens is True


def test_dynamic_templates_and_send_at(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    manage.create_template(
        store, shop.app_id, "d-welcome", subject="Hi {{ name }}", html="<p>Plan {{ plan }}</p>"
    )
    sendgrid = client(postbode, shop.api_key).client.mail.send
    body = {
        "personalizations": [
            {
                "to": [{"email": "a@dest.test"}],
                "dynamic_template_data": {"name": "Ann", "plan": "Gold"},
            },
            {
                "to": [{"email": "b@dest.test"}],
                "dynamic_template_data": {"name": "<b>", "plan": "Free"},
            },
        ],
        "from": {"email": "orders@shop.test"},
        "template_id": "d-welcome",
    }
    assert sendgrid.post(request_body=body).status_code == 202
    received = {m.rcpt_tos[0]: m.message for m in mx_sink.wait_for_sync(2, timeout=30)}
    assert received["a@dest.test"]["Subject"] == "Hi Ann"
    assert "Plan Gold" in received["a@dest.test"].get_body(("html",)).get_content()
    assert received["b@dest.test"]["Subject"] == "Hi <b>"
    assert "Plan Free" in received["b@dest.test"].get_body(("plain",)).get_content()

    later = {**body, "send_at": int(time.time()) + 3600}
    later["personalizations"] = [body["personalizations"][0]]
    answer = sendgrid.post(request_body=later)
    assert answer.status_code == 202
    assert stored(store, answer.headers["X-Message-Id"]).send_at is not None
    with store.read() as conn:
        assert (
            conn.execute(
                select(func.count())
                .select_from(deliveries)
                .where(deliveries.c.status == "scheduled")
            ).scalar_one()
            == 1
        )


@pytest.mark.parametrize(("field", "value"), [("batch_id", "b-1"), ("ip_pool_name", "p")])
def test_what_postbode_lacks_is_refused(
    postbode: HttpPostbode, shop: tenancy.NewApp, field: str, value: object
) -> None:
    body = order_mail().get()
    body[field] = value
    with pytest.raises(HTTPError) as refused:
        client(postbode, shop.api_key).client.mail.send.post(request_body=body)
    assert refused.value.status_code == 400
    assert refused.value.to_dict["errors"][0]["field"] == field
    assert "not supported" in refused.value.to_dict["errors"][0]["message"]


def test_sendgrid_library_sees_sendgrids_errors(
    postbode: HttpPostbode, shop: tenancy.NewApp
) -> None:
    with pytest.raises(HTTPError) as bad_key:
        client(postbode, "pb_nope_nope").send(order_mail())
    assert bad_key.value.status_code == 401
    assert bad_key.value.to_dict["errors"][0]["message"].startswith("The provided authorization")
    with pytest.raises(HTTPError) as foreign:
        client(postbode, shop.api_key).send(order_mail("orders@elsewhere.test"))
    assert foreign.value.status_code == 403
    assert foreign.value.to_dict["errors"][0]["field"] == "from"
    body = order_mail().get()
    del body["personalizations"][0]["to"]
    with pytest.raises(HTTPError) as nobody:
        client(postbode, shop.api_key).client.mail.send.post(request_body=body)
    assert nobody.value.status_code == 400
    assert nobody.value.to_dict["errors"][0]["field"] == "personalizations.0.to"


def anymail_settings(postbode: HttpPostbode, key: str) -> override_settings:
    return override_settings(
        EMAIL_BACKEND="anymail.backends.sendgrid.EmailBackend",
        ANYMAIL={
            "SENDGRID_API_KEY": key,
            "SENDGRID_API_URL": postbode.http_url + "/compat/sendgrid/v3/",
        },
    )


def test_anymail_sendgrid_backend_sends(
    postbode: HttpPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    with no_warnings_from_anymail(), anymail_settings(postbode, shop.api_key):
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
        assert msg.send() == 1
    status = msg.anymail_status  # type: ignore[attr-defined]
    assert status.status == {"queued"}
    received = mx_sink.wait_for_sync(1, timeout=30)[0]
    assert received.message["X-Order"] == "12"
    assert parts(received)["attachments"]["invoice.pdf"][1] == PDF
    # anymail's own message id travels as custom_args (metadata) for its webhooks to match.
    from sqlalchemy import select

    from postbode.store.schema import messages

    with store.read() as conn:
        row = conn.execute(select(messages)).one()
    assert row.tag == "order-confirmation"
    assert row.metadata == {"order": "12", "anymail_id": status.message_id}


def test_anymail_sendgrid_backend_sees_errors(postbode: HttpPostbode, shop: tenancy.NewApp) -> None:
    from anymail.exceptions import AnymailAPIError

    with (
        no_warnings_from_anymail(),
        anymail_settings(postbode, "pb_wrong_key"),
        pytest.raises(AnymailAPIError) as bad,
    ):
        EmailMultiAlternatives("x", "x", "orders@shop.test", ["a@dest.test"]).send()
    assert bad.value.status_code == 401
    with (
        no_warnings_from_anymail(),
        anymail_settings(postbode, shop.api_key),
        pytest.raises(AnymailAPIError) as foreign,
    ):
        EmailMultiAlternatives("x", "x", "orders@elsewhere.test", ["a@dest.test"]).send()
    assert foreign.value.status_code == 403
