"""Webhook endpoints in the store: validation, secrets and rotation, disabling, replays."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import events, utcnow, webhook_requests, webhooks
from postbode.store.sealing import key_for
from postbode.testing.factories import make_app
from postbode.webhooks import manage
from postbode.webhooks.manage import WebhookError


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.test/x",
        "javascript:alert(1)",
        "hooks.test/x",
        "http:///nohost",
        "https://hooks.test:0/x",
        "https://hooks.test:99999/x",
        "https://hooks.test/a b",
        "http://" + "a" * 2000 + ".test/",
    ],
)
def test_only_http_and_https_urls(url: str) -> None:
    with pytest.raises(WebhookError) as info:
        manage.check_url(url)
    assert info.value.field == "url" and info.value.status == 422


def test_event_types_are_checked_against_the_one_list() -> None:
    assert manage.check_event_types(["delivery.bounced", "delivery.bounced", "app.alert"]) == [
        "delivery.bounced",
        "app.alert",
    ]
    with pytest.raises(WebhookError) as info:
        manage.check_event_types(["delivery.delivered", "delivery.exploded"])
    assert info.value.field == "event_types.1"
    with pytest.raises(WebhookError):
        manage.check_format("sendgrid-legacy")


def test_create_shows_the_secret_once(store: Store) -> None:
    app = make_app(store)
    created = manage.create_webhook(
        store, app.app_id, "https://hooks.test/in", ["delivery.bounced"]
    )
    assert created["secret"].startswith("whsec_")
    assert created["enabled"] is True and created["event_types"] == ["delivery.bounced"]
    listed = manage.list_webhooks(store, app.app_id)
    assert [h["id"] for h in listed] == [created["id"]]
    assert "secret" not in listed[0] and "secret" not in manage.get_webhook(
        store, app.app_id, created["id"]
    )


def test_apps_see_only_their_own_webhooks(store: Store) -> None:
    mine, theirs = make_app(store), make_app(store)
    hook = manage.create_webhook(store, theirs.app_id, "https://hooks.test/in")
    assert manage.list_webhooks(store, mine.app_id) == []
    for call in (
        lambda: manage.get_webhook(store, mine.app_id, hook["id"]),
        lambda: manage.update_webhook(store, mine.app_id, hook["id"], enabled=False),
        lambda: manage.delete_webhook(store, mine.app_id, hook["id"]),
        lambda: manage.rotate_secret(store, mine.app_id, hook["id"]),
        lambda: manage.list_requests(store, mine.app_id, hook["id"]),
    ):
        with pytest.raises(WebhookError) as info:
            call()
        assert info.value.status == 404


def test_rotation_keeps_the_previous_secret_for_a_day(store: Store) -> None:
    app = make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    now = utcnow()
    rotated = manage.rotate_secret(store, app.app_id, hook["id"], now=now)
    assert rotated["secret"] != hook["secret"]
    assert rotated["previous_secret_expires_at"] == now + timedelta(hours=24)
    with store.read() as conn:
        row = conn.execute(select(webhooks)).one()
    # Kept sealed, not in clear: they must be readable to sign, so they are encrypted.
    assert rotated["secret"] not in (row.secret, row.previous_secret)
    assert hook["secret"] not in (row.secret, row.previous_secret)
    key = key_for(store)
    assert manage.secrets_in_force(row, now, key) == [rotated["secret"], hook["secret"]]
    later = now + timedelta(hours=24, seconds=1)
    assert manage.secrets_in_force(row, later, key) == [rotated["secret"]]
    shown = manage.get_webhook(store, app.app_id, hook["id"])
    assert shown["previous_secret_expires_at"] is not None


def test_enabling_again_clears_the_failure(store: Store) -> None:
    app = make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    with store.write() as conn:
        row = conn.execute(select(webhooks)).one()
        assert manage.disable(conn, row, "the endpoint answered 410 Gone", utcnow())
    shown = manage.get_webhook(store, app.app_id, hook["id"])
    assert shown["enabled"] is False and "410" in shown["disabled_reason"]
    enabled = manage.update_webhook(store, app.app_id, hook["id"], enabled=True)
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None


def test_disabling_alerts_the_other_endpoints_only(store: Store) -> None:
    app = make_app(store)
    dying = manage.create_webhook(store, app.app_id, "https://dying.test/in")
    other = manage.create_webhook(store, app.app_id, "https://other.test/in")
    with store.write() as conn:
        row = conn.execute(select(webhooks).where(webhooks.c.id == dying["id"])).one()
        assert manage.disable(conn, row, "gone", utcnow())
        assert not manage.disable(conn, row, "gone", utcnow())  # once is enough
    with store.read() as conn:
        alert = conn.execute(select(events).where(events.c.type == "app.alert")).one()
        queued = conn.execute(select(webhook_requests.c.webhook_id)).scalars().all()
    assert alert.data == {
        "alert": "webhook_disabled",
        "webhook_id": dying["id"],
        "url": "https://dying.test/in",
        "reason": "gone",
    }
    assert queued == [other["id"]]


def test_replay_queues_a_new_request(store: Store) -> None:
    app = make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in", ["app.alert"])
    event = Event(app_id=app.app_id, type=EventType.APP_ALERT, data={"alert": "test"})
    with store.write() as conn:
        record(conn, event)
    replayed = manage.replay(store, app.app_id, hook["id"], event.id)
    with store.read() as conn:
        rows = conn.execute(select(webhook_requests).order_by(webhook_requests.c.id)).all()
    assert [r.event_id for r in rows] == [event.id, event.id]
    assert rows[-1].id == replayed["id"] and rows[-1].status == "pending"
    page, cursor = manage.list_requests(store, app.app_id, hook["id"])
    assert [r["id"] for r in page] == [rows[1].id, rows[0].id] and cursor is None
    assert page[0]["event_type"] == "app.alert" and page[0]["attempt_log"] == []


def test_replay_refuses_other_apps_events_and_unsubscribed_types(store: Store) -> None:
    app, other = make_app(store), make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in", ["delivery.bounced"])
    foreign = Event(app_id=other.app_id, type=EventType.APP_ALERT)
    unsubscribed = Event(app_id=app.app_id, type=EventType.APP_ALERT)
    with store.write() as conn:
        record(conn, [foreign, unsubscribed])
    with pytest.raises(WebhookError) as info:
        manage.replay(store, app.app_id, hook["id"], foreign.id)
    assert info.value.status == 404
    with pytest.raises(WebhookError) as info:
        manage.replay(store, app.app_id, hook["id"], uuid.uuid4())
    assert info.value.status == 404
    with pytest.raises(WebhookError) as info:
        manage.replay(store, app.app_id, hook["id"], unsubscribed.id)
    assert info.value.status == 422
    manage.update_webhook(store, app.app_id, hook["id"], enabled=False)
    with pytest.raises(WebhookError) as info:
        manage.replay(store, app.app_id, hook["id"], unsubscribed.id)
    assert info.value.status == 409


def test_delete_removes_queued_requests(store: Store) -> None:
    app = make_app(store)
    hook = manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    with store.write() as conn:
        record(conn, Event(app_id=app.app_id, type=EventType.APP_ALERT))
    manage.delete_webhook(store, app.app_id, hook["id"])
    with store.read() as conn:
        assert conn.execute(select(webhook_requests)).first() is None
