"""Provider-format endpoints through the real webhook worker: the requests a loopback receiver
gets are accepted by django-anymail's tracking views with their signature checks enabled."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import django
import pytest
from django.conf import settings as django_settings
from django.test import RequestFactory, override_settings
from sqlalchemy import update

from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.factories import make_app, make_queued_message
from postbode.webhooks import manage

from .conftest import LOOPBACK

if not django_settings.configured:
    django_settings.configure(
        SECRET_KEY="webhook-tests", INSTALLED_APPS=["anymail"], ALLOWED_HOSTS=["*"], USE_TZ=True
    )
    django.setup()


def test_each_provider_format_reaches_anymail_through_the_worker(
    settings: Settings, store: Store, make_receiver: Callable[..., Any], start_worker: Any
) -> None:
    from anymail.exceptions import AnymailNotSupportedWarning, AnymailWebhookValidationFailure
    from anymail.signals import AnymailTrackingEvent, tracking
    from anymail.webhooks.mailgun import MailgunTrackingWebhookView
    from anymail.webhooks.postmark import PostmarkTrackingWebhookView
    from anymail.webhooks.sendgrid import SendGridTrackingWebhookView

    app = make_app(store)
    message_id, (delivery_id,) = make_queued_message(store, app.app_id, ["alice@dest.test"])
    with store.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(tag="welcome", metadata={"user": "7"})
        )
    receivers = {name: make_receiver() for name in ("postmark", "sendgrid", "mailgun")}
    hooks = {
        name: manage.create_webhook(
            store,
            app.app_id,
            r.url.replace("://", "://anymail:s3cret@") if name == "postmark" else r.url,
            format=name,
            policy=LOOPBACK,
        )
        for name, r in receivers.items()
    }
    with store.write() as conn:
        record(
            conn,
            Event(
                app_id=app.app_id,
                type=EventType.DELIVERY_BOUNCED,
                tag="welcome",
                message_id=message_id,
                delivery_id=delivery_id,
                recipient="alice@dest.test",
                data={"category": "mailbox_full", "hard": False, "reply": "452 4.2.2 Full"},
            ),
        )
    start_worker(settings).notify()
    got = {name: r.wait_for(1)[0] for name, r in receivers.items()}
    assert "authorization" not in got["sendgrid"].headers
    assert got["postmark"].headers["authorization"].startswith("Basic ")

    seen: list[AnymailTrackingEvent] = []

    def receive(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kw: Any) -> None:
        seen.append(event)

    views = {
        "postmark": (PostmarkTrackingWebhookView, {"WEBHOOK_SECRET": "anymail:s3cret"}),
        "sendgrid": (
            SendGridTrackingWebhookView,
            {"SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY": hooks["sendgrid"]["verification_key"]},
        ),
        "mailgun": (
            MailgunTrackingWebhookView,
            {"MAILGUN_WEBHOOK_SIGNING_KEY": hooks["mailgun"]["secret"]},
        ),
    }
    tracking.connect(receive, weak=False)
    try:
        for name, (view, anymail) in views.items():
            request = got[name]
            headers = {k: v for k, v in request.headers.items() if k != "content-type"}
            django_request = RequestFactory().post(
                "/hooks", data=request.body, content_type="application/json", headers=headers
            )
            with warnings.catch_warnings(), override_settings(ANYMAIL=anymail):
                warnings.simplefilter("ignore", AnymailNotSupportedWarning)
                try:
                    status = view.as_view()(django_request).status_code
                except AnymailWebhookValidationFailure as exc:
                    pytest.fail(f"{name}: {exc}")
            assert status == 200, name
    finally:
        tracking.disconnect(receive)
    # A soft bounce Postbode gave up on: bounced in Postmark's words, deferred-or-bounced in
    # the others' (SendGrid "blocked", Mailgun "permanent").
    assert [e.event_type for e in seen] == ["bounced", "bounced", "bounced"]
    assert all(e.recipient == "alice@dest.test" and e.tags == ["welcome"] for e in seen)
    assert all(e.metadata.get("user") == "7" for e in seen)
