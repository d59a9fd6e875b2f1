"""Webhooks end to end: events from real deliveries reach a loopback receiver, signed (checked by
the standardwebhooks library), retried with an attempt log, and dead endpoints get disabled."""

from __future__ import annotations

import gzip
import json
import smtplib
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select, update
from standardwebhooks.webhooks import Webhook

from postbode import tenancy
from postbode.config import Settings
from postbode.endpoints.destinations import CERTIFICATE_TEXT, CONNECTION_TEXT
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import events, utcnow, webhook_attempts, webhook_requests, webhooks
from postbode.testing.factories import make_app, make_queued_message
from postbode.testing.servers import PostbodeInProcess
from postbode.testing.sink import Rule, Script, SmtpSink
from postbode.webhooks import manage

from .conftest import LOOPBACK


def create_webhook(store: Store, app_id: int, url: str, *args: Any, **kwargs: Any) -> Any:
    """An endpoint at a loopback receiver, allowed as the settings of these tests allow it."""
    return manage.create_webhook(store, app_id, url, *args, policy=LOOPBACK, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll the store until `predicate` holds (the worker writes from its own thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def requests(store: Store) -> list[Any]:
    with store.read() as conn:
        return list(conn.execute(select(webhook_requests).order_by(webhook_requests.c.id)).all())


def attempt_count(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(webhook_attempts)).scalar_one())


def hook_row(store: Store, hook_id: int) -> Any:
    with store.read() as conn:
        return conn.execute(select(webhooks).where(webhooks.c.id == hook_id)).one()


def emit(store: Store, app_id: int, type: EventType = EventType.DELIVERY_DELIVERED) -> Event:
    """Record one event about a real (queued) message, as a state change would."""
    message_id, (delivery_id,) = make_queued_message(store, app_id, ["alice@dest.test"])
    event = Event(
        app_id=app_id,
        type=type,
        message_id=message_id,
        delivery_id=delivery_id,
        recipient="alice@dest.test",
        data={"reply": "250 2.0.0 OK"},
    )
    with store.write() as conn:
        record(conn, event)
    return event


# -- the whole pipeline ------------------------------------------------------------------------


def test_delivered_deferred_and_bounced_reach_the_receiver_signed(
    settings: Settings, store: Store, receiver: Any, start_worker: Any
) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    hook = create_webhook(store, shop.app_id, receiver.url)
    script = Script(
        Rule.rcpt("grey@dest.test", "451 4.7.1 Greylisted, try again in 5 minutes"),
        Rule.rcpt("nobody@dest.test", "550 5.1.1 <nobody@dest.test>: User unknown"),
    )
    with SmtpSink(script=script) as sink:
        settings = settings.model_copy(
            update={"transport_map": f"dest.test={sink.host}:{sink.port}"}
        )
        worker = start_worker(settings)
        with PostbodeInProcess(settings, store) as postbode:
            msg = EmailMessage()
            msg["From"] = "Shop <orders@shop.test>"
            msg["To"] = "alice@dest.test, grey@dest.test, nobody@dest.test"
            msg["Subject"] = "Your order"
            msg["X-Postbode-Tag"] = "order-shipped"
            msg["X-Postbode-Metadata-Order"] = "42"
            msg.set_content("It shipped.")
            with smtplib.SMTP(postbode.host, postbode.port) as client:
                client.login(shop.smtp_username, shop.smtp_password)
                client.send_message(msg)
            worker.notify()
            wanted = {"delivery.delivered", "delivery.deferred", "delivery.bounced"}
            got = receiver.wait_for(lambda rs: wanted <= {json.loads(r.body)["type"] for r in rs})
    payloads = {}
    for request in got:
        assert request.path == "/hooks"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"].startswith("Postbode-Webhooks/")
        payload = Webhook(hook["secret"]).verify(request.body, request.headers)
        assert request.headers["webhook-id"] == payload["id"]
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
        payloads.setdefault(payload["type"], []).append(payload)
    assert {p["delivery"]["recipient"] for p in payloads["delivery.queued"]} == {
        "alice@dest.test",
        "grey@dest.test",
        "nobody@dest.test",
    }
    (delivered,) = payloads["delivery.delivered"]
    (deferred,) = payloads["delivery.deferred"]
    (bounced,) = payloads["delivery.bounced"]
    assert delivered["delivery"]["recipient"] == "alice@dest.test"
    assert delivered["app"] == "shop" and delivered["created_at"].endswith("Z")
    assert delivered["message"]["tag"] == "order-shipped"
    assert delivered["message"]["metadata"] == {"order": "42"}
    assert delivered["message"]["stream"] == "transactional"
    assert delivered["message"]["message_id"].startswith("<")
    assert deferred["delivery"]["recipient"] == "grey@dest.test"
    assert "451 4.7.1" in deferred["data"]["reply"] and deferred["data"]["next_attempt_at"]
    assert bounced["delivery"]["recipient"] == "nobody@dest.test"
    assert bounced["data"]["category"] == "user_unknown" and bounced["data"]["hard"] is True
    with store.read() as conn:  # each payload is the stored event, by id
        stored = dict(conn.execute(select(events.c.id, events.c.type)).all())
    assert {str(k): v for k, v in stored.items()}[bounced["id"]] == "delivery.bounced"


# -- retries and the attempt log -----------------------------------------------------------------


def test_500_three_times_then_200_on_the_fourth_try(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    receiver = make_receiver((500, b"err 1"), (500, b"err 2"), (500, b"err 3"), (200, b"ok"))
    app = make_app(store)
    hook = create_webhook(store, app.app_id, receiver.url)
    worker = start_worker(settings)
    event = emit(store, app.app_id)
    worker.notify()
    for tries in (1, 2, 3):
        receiver.wait_for(tries)
        wait_for(lambda t=tries: attempt_count(store) == t)
        (request,) = requests(store)
        assert request.status == "pending" and request.attempts == tries
        wait = (request.next_attempt_at - utcnow()).total_seconds()
        assert 30 < wait <= 3600, "backed off, within the cap"
        with store.write() as conn:  # no waiting out the backoff in a test
            conn.execute(update(webhook_requests).values(next_attempt_at=utcnow()))
        worker.notify()
    got = receiver.wait_for(4)
    wait_for(lambda: requests(store)[0].status == "delivered")
    assert len(got) == 4
    for r in got:
        assert Webhook(hook["secret"]).verify(r.body, r.headers)["id"] == str(event.id)
    assert {r.headers["webhook-id"] for r in got} == {str(event.id)}  # one id across retries
    (request,) = requests(store)
    assert (request.attempts, request.last_status_code, request.last_error) == (4, 200, None)
    log, _ = manage.list_requests(store, app.app_id, hook["id"])
    attempts = log[0]["attempt_log"]
    assert [(a["status_code"], a["response_body"]) for a in attempts] == [
        (500, "err 1"),
        (500, "err 2"),
        (500, "err 3"),
        (200, "ok"),
    ]
    assert all(a["duration_ms"] >= 0 and a["started_at"] for a in attempts)
    assert hook_row(store, hook["id"]).failing_since is None  # the success cleared it


def test_410_gone_disables_the_endpoint_and_alerts(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    gone = make_receiver((410, b"gone"))
    other = make_receiver()
    app = make_app(store)
    dead = create_webhook(store, app.app_id, gone.url, ["delivery.delivered"])
    alive = create_webhook(store, app.app_id, other.url, ["app.alert"])
    start_worker(settings).notify()
    emit(store, app.app_id)
    (alert,) = other.wait_for(1)
    payload = Webhook(alive["secret"]).verify(alert.body, alert.headers)
    assert payload["type"] == "app.alert" and payload["message"] is None
    assert payload["data"] == {
        "alert": "webhook_disabled",
        "webhook_id": dead["id"],
        "url": gone.url,
        "reason": "the endpoint answered 410 Gone",
    }
    row = hook_row(store, dead["id"])
    assert row.enabled is False and "410" in row.disabled_reason
    assert [r.status for r in requests(store) if r.webhook_id == dead["id"]] == ["failed"]
    assert len(gone.requests) == 1


def test_failing_for_three_days_disables(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    failing = make_receiver((500, b"down"))
    app = make_app(store)
    hook = create_webhook(store, app.app_id, failing.url)
    with store.write() as conn:
        conn.execute(update(webhooks).values(failing_since=utcnow() - timedelta(days=3, minutes=1)))
    start_worker(settings).notify()
    emit(store, app.app_id, EventType.DELIVERY_BOUNCED)
    wait_for(lambda: not hook_row(store, hook["id"]).enabled)
    assert "no successful delivery for 3.0 days" in hook_row(store, hook["id"]).disabled_reason
    with store.read() as conn:
        alert = conn.execute(select(events.c.data).where(events.c.type == "app.alert")).scalar()
    assert alert["webhook_id"] == hook["id"]
    # the alert was not queued to the endpoint it is about: no loop
    wait_for(lambda: all(r.status in ("failed", "pending") for r in requests(store)))
    assert len(requests(store)) == 1


def test_retried_for_a_day_then_failed(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    failing = make_receiver((502, b"bad gateway"))
    app = make_app(store)
    hook = create_webhook(store, app.app_id, failing.url)
    emit(store, app.app_id)
    with store.write() as conn:
        conn.execute(update(webhook_requests).values(created_at=utcnow() - timedelta(hours=24)))
    start_worker(settings).notify()
    wait_for(lambda: requests(store)[0].status == "failed")
    assert requests(store)[0].last_status_code == 502
    assert hook_row(store, hook["id"]).enabled is True  # one day is not three


def test_timeouts_and_refused_connections_are_logged(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    slow = make_receiver((200, b"late"))
    slow.release.clear()  # never answers while the test runs
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    app = make_app(store)
    create_webhook(store, app.app_id, slow.url)
    create_webhook(store, app.app_id, closed)
    start_worker(settings.model_copy(update={"webhook_timeout": 0.5})).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 2)
    slow.release.set()
    with store.read() as conn:
        errors = sorted(conn.execute(select(webhook_attempts.c.error)).scalars())
    assert errors == sorted([CONNECTION_TEXT, "timed out after 0.5 s"])
    assert all(r.status == "pending" for r in requests(store))


def test_only_a_short_sanitised_excerpt_of_the_response_is_logged(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    chatty = make_receiver((200, "é\u202e\x1b[31m\r\n ".encode() + b"x" * 5000))
    app = make_app(store)
    create_webhook(store, app.app_id, chatty.url)
    start_worker(settings).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 1)
    with store.read() as conn:
        body = conn.execute(select(webhook_attempts.c.response_body)).scalar_one()
    assert body == "é[31m " + "x" * 194  # no bidi override, escape or line break; 200 chars


def test_a_compressed_response_body_is_logged_as_text(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    gzipped = make_receiver((200, gzip.compress(b"accepted"), {"content-encoding": "gzip"}))
    app = make_app(store)
    create_webhook(store, app.app_id, gzipped.url)
    start_worker(settings).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 1)
    with store.read() as conn:
        assert conn.execute(select(webhook_attempts.c.response_body)).scalar_one() == "accepted"


def test_rotation_signs_with_both_secrets(
    settings: Settings, store: Store, receiver: Any, start_worker: Any
) -> None:
    app = make_app(store)
    hook = create_webhook(store, app.app_id, receiver.url)
    rotated = manage.rotate_secret(store, app.app_id, hook["id"])
    start_worker(settings).notify()
    emit(store, app.app_id)
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(hook["secret"]).verify(got.body, got.headers)  # receivers not yet switched
    Webhook(rotated["secret"]).verify(got.body, got.headers)  # receivers already switched


def test_requests_of_a_disabled_endpoint_fail_unsent(
    settings: Settings, store: Store, receiver: Any, start_worker: Any
) -> None:
    app = make_app(store)
    hook = create_webhook(store, app.app_id, receiver.url)
    emit(store, app.app_id)
    manage.update_webhook(store, app.app_id, hook["id"], enabled=False)
    start_worker(settings).notify()
    wait_for(lambda: requests(store)[0].status == "failed")
    assert requests(store)[0].last_error == "endpoint disabled"
    assert receiver.requests == []


def test_concurrency_is_bounded(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    stalled = make_receiver()
    stalled.release.clear()
    app = make_app(store)
    create_webhook(store, app.app_id, stalled.url)
    for _ in range(10):
        emit(store, app.app_id)
    start_worker(settings.model_copy(update={"webhook_concurrency": 3})).notify()
    stalled.wait_for(3)
    assert sorted(r.status for r in requests(store)).count("sending") == 3
    stalled.release.set()
    stalled.wait_for(10)
    wait_for(lambda: all(r.status == "delivered" for r in requests(store)))


@pytest.mark.parametrize("status", [301, 307, 404])
def test_redirects_and_client_errors_are_failures(
    status: int, settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    receiver = make_receiver((status, b"", {"location": "/moved"}))
    app = make_app(store)
    create_webhook(store, app.app_id, receiver.url)
    start_worker(settings).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 1)
    (request,) = requests(store)
    assert (request.status, request.last_status_code) == ("pending", status)
    assert [r.path for r in receiver.requests] == ["/hooks"]  # the Location was not followed


# -- the HTTP client -----------------------------------------------------------------------------


def test_retry_after_sets_the_next_attempt(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    busy = make_receiver((503, b"busy", {"retry-after": "1800"}))
    app = make_app(store)
    create_webhook(store, app.app_id, busy.url)
    start_worker(settings).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 1)
    (request,) = requests(store)
    wait = (request.next_attempt_at - utcnow()).total_seconds()
    assert request.status == "pending" and 1790 < wait <= 1800, "not the 60 s of backoff"


def test_connections_are_reused_bounded_and_closed_on_stop(
    settings: Settings, store: Store, receiver: Any, start_worker: Any
) -> None:
    app = make_app(store)
    create_webhook(store, app.app_id, receiver.url)
    for _ in range(12):
        emit(store, app.app_id)
    worker = start_worker(settings.model_copy(update={"webhook_concurrency": 2}))
    worker.notify()
    got = receiver.wait_for(12)
    wait_for(lambda: all(r.status == "delivered" for r in requests(store)))
    assert len({r.peer_port for r in got}) <= 2, "keep-alive, at most one connection a slot"
    assert receiver.open_connections >= 1
    worker.close()
    receiver.wait_until_closed()


def test_no_cookies_kept_and_no_proxy_from_the_environment(
    settings: Settings,
    store: Store,
    make_receiver: Any,
    start_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as s:  # a proxy nobody runs: a request sent through it would fail
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    receiver = make_receiver((200, b"ok", {"set-cookie": "session=abc; Path=/"}))
    app = make_app(store)
    # By a name: cookie jars ignore cookies from IP addresses.
    create_webhook(store, app.app_id, receiver.url.replace("127.0.0.1", "localhost"))
    worker = start_worker(settings.model_copy(update={"webhook_concurrency": 1}))
    emit(store, app.app_id)
    worker.notify()
    receiver.wait_for(1)
    wait_for(lambda: requests(store)[0].status == "delivered")
    emit(store, app.app_id)
    worker.notify()
    got = receiver.wait_for(2)
    assert all("cookie" not in r.headers for r in got)
    wait_for(lambda: all(r.status == "delivered" for r in requests(store)))


def test_an_untrusted_certificate_is_refused(
    settings: Settings, store: Store, make_receiver: Any, start_worker: Any
) -> None:
    impostor = make_receiver(tls=True)
    app = make_app(store)
    create_webhook(store, app.app_id, impostor.url)
    start_worker(settings).notify()
    emit(store, app.app_id)
    wait_for(lambda: attempt_count(store) == 1)
    with store.read() as conn:
        error = conn.execute(select(webhook_attempts.c.error)).scalar_one()
    assert error == CERTIFICATE_TEXT
    assert impostor.requests == []
    assert requests(store)[0].status == "pending"


def test_every_webhook_request_attempt_is_one_structured_log_line(
    settings: Settings,
    store: Store,
    make_receiver: Any,
    start_worker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="postbode.webhooks.deliver")
    receiver = make_receiver((503, b"busy"))
    app = make_app(store)
    hook = create_webhook(store, app.app_id, receiver.url)
    worker = start_worker(settings)
    event = emit(store, app.app_id)
    worker.notify()
    receiver.wait_for(1)
    wait_for(lambda: attempt_count(store) == 1)

    def lines() -> list[dict[str, str]]:
        return [
            dict(field.split("=", 1) for field in r.getMessage().split()[1:])
            for r in caplog.records
            if r.getMessage().startswith("webhook.attempt ")
        ]

    wait_for(lambda: len(lines()) == 1)
    (line,) = lines()
    (request,) = requests(store)
    assert line["request"] == str(request.id) and line["webhook"] == str(hook["id"])
    assert line["event"] == str(event.id) and line["url"] == receiver.url
    assert line["status"] == "503" and int(line["duration_ms"]) >= 0 and line["attempt"] == "1"
