"""django-anymail's tracking webhook views, with their real signature checks enabled, accept
Postbode's webhook requests in the Postmark, SendGrid and Mailgun formats and map them to
anymail's normalised events (delivered, bounced, opened, clicked, complained)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from anymail.exceptions import AnymailWebhookValidationFailure
from anymail.signals import AnymailTrackingEvent, tracking
from anymail.webhooks.mailgun import MailgunTrackingWebhookView
from anymail.webhooks.postmark import PostmarkTrackingWebhookView
from anymail.webhooks.sendgrid import SendGridTrackingWebhookView
from django.test import RequestFactory, override_settings
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, events, messages, utcnow, webhook_requests, webhooks
from postbode.store.sealing import key_for
from postbode.web.app import create_app
from postbode.webhooks import formats, manage

from .conftest import no_warnings_from_anymail

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient asks for httpx2
    from fastapi.testclient import TestClient

# Each Postbode event as the pipeline records it, and the anymail event type it must become.
HAPPENINGS: list[tuple[EventType, dict[str, Any], str]] = [
    (
        EventType.DELIVERY_DELIVERED,
        {"reply": "250 2.0.0 OK queued", "mx": "mx1.dest.test"},
        "delivered",
    ),
    (
        EventType.DELIVERY_BOUNCED,
        {
            "category": "user_unknown",
            "hard": True,
            "status": "5.1.1",
            "source": "smtp",
            "reply": "550 5.1.1 User unknown",
        },
        "bounced",
    ),
    (
        EventType.MESSAGE_OPENED,
        {"first": True, "user_agent": "Mail/1.0", "ip": "127.0.0.9"},
        "opened",
    ),
    (
        EventType.MESSAGE_CLICKED,
        {"url": "https://shop.test/orders/12", "user_agent": "Mail/1.0", "ip": "127.0.0.9"},
        "clicked",
    ),
    (EventType.MESSAGE_COMPLAINED, {"feedback_type": "abuse", "source": "arf"}, "complained"),
]


@pytest.fixture
def received(store: Store, settings: Settings) -> dict[str, Any]:
    """A message the shop app sent (through the Postmark-compatible API) to alice."""
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    with TestClient(create_app(settings, store)) as client:
        answer = client.post(
            "/compat/postmark/email",
            headers={"X-Postmark-Server-Token": app.api_key},
            json={
                "From": "orders@shop.test",
                "To": "alice@dest.test",
                "Subject": "Your order 12",
                "TextBody": "Thanks",
                "Tag": "order-confirmation",
                "Metadata": {"order": "12"},
            },
        )
    assert answer.status_code == 200, answer.text
    with store.read() as conn:
        message = conn.execute(select(messages)).one()
    from postbode.store.schema import deliveries

    with store.read() as conn:
        delivery = conn.execute(select(deliveries)).one()
    return {"app": app, "message": message, "delivery": delivery}


@pytest.fixture
def seen() -> Iterator[list[AnymailTrackingEvent]]:
    found: list[AnymailTrackingEvent] = []

    def receive(sender: Any, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
        found.append(event)

    tracking.connect(receive, weak=False)
    yield found
    tracking.disconnect(receive)


def happen(store: Store, received: dict[str, Any]) -> None:
    """Record the events as the pipeline does (webhook requests are queued with them)."""
    message, delivery = received["message"], received["delivery"]
    start = utcnow()
    with store.write() as conn:
        for i, (kind, data, _) in enumerate(HAPPENINGS):
            record(
                conn,
                Event(
                    app_id=message.app_id,
                    type=kind,
                    tag=message.tag,
                    message_id=message.id,
                    delivery_id=delivery.id,
                    recipient=delivery.recipient,
                    data=data,
                    at=start + timedelta(seconds=i),
                ),
            )


def requests_for(store: Store, hook_id: int) -> list[formats.Outgoing]:
    """The endpoint's queued requests, rendered as the webhook worker sends them."""
    now = utcnow()
    with store.read() as conn:
        hook = conn.execute(select(webhooks).where(webhooks.c.id == hook_id)).one()
        queued = conn.execute(
            select(events, apps.c.name.label("app"))
            .join(webhook_requests, webhook_requests.c.event_id == events.c.id)
            .join(apps, apps.c.id == events.c.app_id)
            .where(webhook_requests.c.webhook_id == hook_id)
            .order_by(events.c.created_at)
        ).all()
        rows = {m.id: m for m in conn.execute(select(messages))}
    secrets = manage.secrets_in_force(hook, now, key_for(store))
    return [
        formats.render(hook._mapping, [(e._mapping, rows[e.message_id]._mapping)], secrets, now)
        for e in queued
        if e.type in formats.EVENT_TYPES[hook.format] and e.type != "delivery.queued"
    ]


def post(view: Any, outgoing: formats.Outgoing) -> int:
    headers = {k: v for k, v in outgoing.headers.items() if k.lower() != "content-type"}
    request = RequestFactory().post(
        "/anymail/tracking/", data=outgoing.body, content_type="application/json", headers=headers
    )
    try:
        return int(view(request).status_code)
    except AnymailWebhookValidationFailure:  # Django's handler answers it with 400
        return 400


def check(seen: list[AnymailTrackingEvent], received: dict[str, Any]) -> None:
    assert [e.event_type for e in seen] == [expected for _, _, expected in HAPPENINGS]
    for event in seen:
        assert event.recipient == "alice@dest.test"
        assert event.tags == ["order-confirmation"]
        assert event.metadata.get("order") == "12"
    assert seen[3].click_url == "https://shop.test/orders/12"


def test_postmark_webhooks_reach_anymail(
    store: Store, received: dict[str, Any], seen: list[AnymailTrackingEvent]
) -> None:
    hook = manage.create_webhook(
        store,
        received["message"].app_id,
        "https://hooks:s3cret@app.test/anymail/postmark/",
        format="postmark",
    )
    assert set(hook["event_types"]) == formats.EVENT_TYPES["postmark"]
    happen(store, received)
    outgoing = requests_for(store, hook["id"])
    assert len(outgoing) == len(HAPPENINGS)
    assert outgoing[0].url == "https://app.test/anymail/postmark/"
    with override_settings(ANYMAIL={"WEBHOOK_SECRET": "hooks:s3cret"}):
        view = PostmarkTrackingWebhookView.as_view()
        assert [post(view, o) for o in outgoing] == [200] * len(HAPPENINGS)
        # The basic-auth check is real: other credentials are refused.
        forged = formats.Outgoing(
            outgoing[0].url,
            {**outgoing[0].headers, "authorization": "Basic aG9va3M6d3Jvbmc="},
            outgoing[0].body,
        )
        assert post(view, forged) == 400
    check(seen, received)
    assert seen[1].reject_reason == "bounced"
    assert all(e.message_id == str(received["message"].id) for e in seen)
    bounce = json.loads(outgoing[1].body)
    assert (bounce["Type"], bounce["TypeCode"], bounce["Inactive"]) == ("HardBounce", 1, True)


def test_sendgrid_webhooks_reach_anymail(
    store: Store, received: dict[str, Any], seen: list[AnymailTrackingEvent]
) -> None:
    hook = manage.create_webhook(
        store, received["message"].app_id, "https://app.test/anymail/sendgrid/", format="sendgrid"
    )
    key = hook["verification_key"]
    assert key and key == formats.verification_key("sendgrid", hook["secret"])
    happen(store, received)
    outgoing = requests_for(store, hook["id"])
    assert len(outgoing) == len(HAPPENINGS)
    assert all(isinstance(json.loads(o.body), list) for o in outgoing)
    with (
        no_warnings_from_anymail(),
        override_settings(ANYMAIL={"SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY": key}),
    ):
        view = SendGridTrackingWebhookView.as_view()
        assert [post(view, o) for o in outgoing] == [200] * len(HAPPENINGS)
        tampered = formats.Outgoing(
            outgoing[0].url, outgoing[0].headers, outgoing[0].body.replace(b"alice", b"mallory")
        )
        assert post(view, tampered) == 400
    check(seen, received)
    bounce = json.loads(outgoing[1].body)[0]
    assert (bounce["type"], bounce["bounce_classification"]) == ("bounce", "Invalid Address")


def test_sendgrid_batches_several_events_in_one_signed_array(
    store: Store, received: dict[str, Any], seen: list[AnymailTrackingEvent]
) -> None:
    hook = manage.create_webhook(
        store, received["message"].app_id, "https://app.test/sg/", format="sendgrid"
    )
    happen(store, received)
    now = utcnow()
    with store.read() as conn:
        row = conn.execute(select(webhooks).where(webhooks.c.id == hook["id"])).one()
        found = conn.execute(
            select(events, apps.c.name.label("app"))
            .join(apps, apps.c.id == events.c.app_id)
            .where(events.c.type.in_([str(kind) for kind, _, _ in HAPPENINGS]))
            .order_by(events.c.created_at)
        ).all()
        message = conn.execute(select(messages)).one()
    one = formats.render(
        row._mapping,
        [(e._mapping, message._mapping) for e in found],
        manage.secrets_in_force(row, now, key_for(store)),
        now,
    )
    with (
        no_warnings_from_anymail(),
        override_settings(
            ANYMAIL={"SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY": hook["verification_key"]}
        ),
    ):
        assert post(SendGridTrackingWebhookView.as_view(), one) == 200
    check(seen, received)


def test_mailgun_webhooks_reach_anymail(
    store: Store, received: dict[str, Any], seen: list[AnymailTrackingEvent]
) -> None:
    hook = manage.create_webhook(
        store, received["message"].app_id, "https://app.test/anymail/mailgun/", format="mailgun"
    )
    happen(store, received)
    outgoing = requests_for(store, hook["id"])
    assert len(outgoing) == len(HAPPENINGS)
    with override_settings(ANYMAIL={"MAILGUN_WEBHOOK_SIGNING_KEY": hook["secret"]}):
        view = MailgunTrackingWebhookView.as_view()
        assert [post(view, o) for o in outgoing] == [200] * len(HAPPENINGS)
    with override_settings(ANYMAIL={"MAILGUN_WEBHOOK_SIGNING_KEY": "whsec_another"}):
        assert post(MailgunTrackingWebhookView.as_view(), outgoing[0]) == 400
    check(seen[: len(HAPPENINGS)], received)
    assert seen[1].reject_reason == "bounced"
    assert all(e.message_id == received["message"].message_id_header for e in seen)
    failed = json.loads(outgoing[1].body)["event-data"]
    assert (failed["event"], failed["severity"], failed["reason"]) == (
        "failed",
        "permanent",
        "bounce",
    )


def test_a_provider_format_refuses_events_it_has_no_name_for(
    store: Store, received: dict[str, Any]
) -> None:
    with pytest.raises(manage.WebhookError) as refused:
        manage.create_webhook(
            store,
            received["message"].app_id,
            "https://app.test/",
            ["domain.dns_changed"],
            format="postmark",
        )
    assert refused.value.field == "event_types.0"
