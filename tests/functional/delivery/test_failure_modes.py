"""Delivery failure modes end to end: refused MX, 5xx, drops, stalls, DNS, expiry, TLS policy."""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import apps, attempts, deliveries, events, utcnow
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import events_refused_for, make_queued_message
from postbode.testing.servers import PostbodeInProcess, StartPostbode, send
from postbode.testing.sink import DROP, STALL, Rule, SmtpSink, Stage
from postbode.web.app import create_app

# Small client timeouts for the stall tests: long enough for a loaded CI machine to answer an
# EHLO, short enough that a stalled peer costs a test about a second.
TIMEOUT = 1.0

# The UI shows last_reply as the reason a delivery is deferred; without a reply (drop, timeout,
# refused TLS) the outcome's reason belongs there, not NULL.
WHY = "a deferral without an SMTP reply must still say why in last_reply"


# -- peers and fixtures -----------------------------------------------------------------------


@contextlib.contextmanager
def refusing_address() -> Iterator[str]:
    """A random 127.x.y.z whose port 25 is bound but not listening, so connects are refused
    (and no parallel test can start listening there meanwhile)."""
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
        sock = socket.socket()
        try:
            sock.bind((host, 25))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        with sock:
            yield host
        return
    raise RuntimeError("no free loopback address for a refusing MX")


# -- helpers --------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll the store (nothing else announces its changes) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def delivery(store: Store, recipient: str) -> dict[str, Any]:
    with store.read() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.recipient == recipient)).mappings()
        return dict(row.one())


def status_of(store: Store, recipient: str) -> str | None:
    with store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()


def wait_status(store: Store, recipient: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    try:
        wait_for(lambda: status_of(store, recipient) == status, timeout)
    except TimeoutError:
        now = status_of(store, recipient)
        raise TimeoutError(f"{recipient} not {status} within {timeout}s (is {now})") from None
    return delivery(store, recipient)


def events_of(store: Store, recipient: str) -> list[tuple[str, dict[str, Any]]]:
    with store.read() as conn:
        rows = conn.execute(
            select(events.c.type, events.c.data)
            .where(events.c.recipient == recipient)
            .order_by(events.c.id)
        ).all()
    return [(r.type, r.data) for r in rows]


def attempts_of(store: Store, delivery_id: Any) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(attempts)
            .where(attempts.c.delivery_id == delivery_id)
            .order_by(attempts.c.started_at)
        ).mappings()
        return [dict(r) for r in rows]


def retry_now(server: PostbodeInProcess) -> None:
    """Make deferred deliveries due now and wake the worker, instead of waiting out backoff."""
    with server.store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.status == "deferred")
            .values(next_attempt_at=utcnow())
        )
    # The worker's wake-up event belongs to its loop, which runs in another thread.
    assert server._thread is not None
    server._thread.loop.call_soon_threadsafe(server.worker.notify)


def rcpt_replies(sink: SmtpSink, recipient: str) -> list[str | None]:
    return sink.replies(Stage.RCPT, recipient)


# -- the first MX refuses -----------------------------------------------------------------------


def test_refused_first_mx_falls_back_to_the_second(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with refusing_address() as dead, SmtpSink.on_random_loopback(tls=True) as backup:
        dns_server.add_mx("dest.test", [(10, "mx1.dest.test"), (20, "mx2.dest.test")])
        dns_server.add_a("mx1.dest.test", dead)
        dns_server.add_a("mx2.dest.test", backup.host)
        postbode = start_postbode()
        send(postbode, shop, "alice@dest.test")
        (received,) = backup.wait_for_sync(1, timeout=15)
        row = wait_status(store, "alice@dest.test", "delivered")
    assert received.rcpt_tos == ("alice@dest.test",)
    assert row["mx"] == "mx2.dest.test" and row["attempts"] == 1
    (attempt,) = attempts_of(store, row["id"])
    assert (attempt["mx_host"], attempt["ip"], attempt["outcome"]) == (
        "mx2.dest.test",
        backup.host,
        "Delivered",
    )


# -- permanent refusals are final ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        lambda: Rule.rcpt("nobody@dest.test", "550 5.1.1 <nobody@dest.test>: User unknown"),
        lambda: Rule.data("550 5.7.1 Message refused", match="nobody@dest.test"),
    ],
    ids=["rcpt", "data"],
)
def test_550_is_a_hard_fail_and_never_retried(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    store: Store,
    rule: Callable[[], Rule],
) -> None:
    mx_sink.script.add(rule())
    postbode = start_postbode()
    send(postbode, shop, "nobody@dest.test")
    row = wait_status(store, "nobody@dest.test", "bounced")
    assert row["attempts"] == 1 and row["last_reply"].startswith("550 5.")
    # Tempt a retry, then use a later delivery as the barrier: once it is through, the worker
    # has claimed again and would have taken the bounced one too if it were due.
    retry_now(postbode)
    send(postbode, shop, "ok@dest.test")
    wait_status(store, "ok@dest.test", "delivered")
    assert rcpt_replies(mx_sink, "nobody@dest.test") != []
    assert len(rcpt_replies(mx_sink, "nobody@dest.test")) == 1, "a 5xx must not be retried"
    assert [r for r in mx_sink.messages if "nobody@dest.test" in r.rcpt_tos] == []
    row = delivery(store, "nobody@dest.test")
    assert (row["status"], row["attempts"]) == ("bounced", 1)
    assert [t for t, _ in events_of(store, "nobody@dest.test")] == [
        "delivery.queued",
        "delivery.bounced",
    ]


# -- transient trouble: retried, delivered once --------------------------------------------------


def test_connection_dropped_mid_data_is_retried_and_delivered_once(
    start_postbode: StartPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    # The sink reads the whole message, then cuts the connection instead of answering "."
    mx_sink.script.add(Rule.data(DROP, "250 2.0.0 OK", match="cut@dest.test"))
    postbode = start_postbode()
    send(postbode, shop, "cut@dest.test")
    row = wait_status(store, "cut@dest.test", "deferred")
    assert row["attempts"] == 1
    (deferred,) = [d for t, d in events_of(store, "cut@dest.test") if t == "delivery.deferred"]
    assert "connection lost" in deferred["reason"]

    retry_now(postbode)
    wait_status(store, "cut@dest.test", "delivered")
    assert len([m for m in mx_sink.messages if m.rcpt_tos == ("cut@dest.test",)]) == 1
    assert mx_sink.replies(Stage.DATA, "cut@dest.test") == [None, "250 2.0.0 OK"]
    assert delivery(store, "cut@dest.test")["attempts"] == 2
    assert row["last_reply"] == deferred["reason"], WHY


@pytest.mark.parametrize(
    ("rule", "waiting_for"),
    [
        (lambda: Rule.rcpt("slow@dest.test", STALL, "250 2.1.5 OK"), "reply to RCPT TO"),
        (lambda: Rule.data(STALL, "250 2.0.0 OK", match="slow@dest.test"), "reply to end of data"),
    ],
    ids=["rcpt", "end-of-data"],
)
def test_stalled_server_times_out_as_a_soft_fail(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    dns_server: LoopbackDNS,
    store: Store,
    rule: Callable[[], Rule],
    waiting_for: str,
) -> None:
    with SmtpSink.on_random_loopback() as sink:  # plain text: no TLS handshake under the timeout
        dns_server.add_mx("dest.test", [(10, "mx1.dest.test")])
        dns_server.add_a("mx1.dest.test", sink.host)
        sink.script.add(rule())  # rules count their uses: a fresh one per test
        postbode = start_postbode(
            smtp_command_timeout=TIMEOUT, smtp_data_timeout=TIMEOUT, smtp_connect_timeout=TIMEOUT
        )
        send(postbode, shop, "slow@dest.test")
        row = wait_status(store, "slow@dest.test", "deferred")
        (deferred,) = [d for t, d in events_of(store, "slow@dest.test") if t == "delivery.deferred"]
        assert deferred["reason"] == f"timed out after {TIMEOUT:g} s waiting for {waiting_for}"
        (attempt,) = attempts_of(store, row["id"])
        assert attempt["outcome"] == "SoftFail" and "timed out" in attempt["transcript"]

        retry_now(postbode)
        wait_status(store, "slow@dest.test", "delivered")
        assert len(sink.messages) == 1
    assert row["last_reply"] == deferred["reason"], WHY


# -- DNS -----------------------------------------------------------------------------------------


def test_null_mx_is_a_hard_fail_with_a_clear_reason(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    dns_server.add_null_mx("nomail.test")
    postbode = start_postbode()
    send(postbode, shop, "alice@nomail.test")
    row = wait_status(store, "alice@nomail.test", "bounced")
    assert row["last_reply"] == "550 5.1.10 nomail.test accepts no mail (null MX, RFC 7505)"
    assert row["bounce_status"] == "5.1.10" and row["hard"] is True
    assert attempts_of(store, row["id"]) == [], "no SMTP connection was made"
    assert dns_server.query_count("nomail.test", "MX") == 1
    bounced = [d for t, d in events_of(store, "alice@nomail.test") if t == "delivery.bounced"]
    assert bounced and "null MX" in bounced[0]["reply"]


def test_nxdomain_is_a_hard_fail(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    postbode = start_postbode()
    send(postbode, shop, "alice@no-such-domain.test")
    row = wait_status(store, "alice@no-such-domain.test", "bounced")
    assert row["last_reply"] == "550 5.1.2 no-such-domain.test: domain does not exist (NXDOMAIN)"
    assert row["bounce_category"] == "domain_invalid" and row["hard"] is True
    assert attempts_of(store, row["id"]) == []


def test_servfail_defers_then_delivers_once_dns_answers(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    dns_server: LoopbackDNS,
    mx_sink: SmtpSink,
    store: Store,
) -> None:
    dns_server.servfail("dest.test", "MX")
    postbode = start_postbode()
    send(postbode, shop, "alice@dest.test")
    row = wait_status(store, "alice@dest.test", "deferred")
    assert row["last_reply"].startswith("451 4.4.3 MX lookup for dest.test failed")
    assert row["next_attempt_at"] > utcnow() + timedelta(seconds=30)
    assert mx_sink.connections == 0

    dns_server.heal("dest.test")
    retry_now(postbode)
    wait_status(store, "alice@dest.test", "delivered")
    assert len(mx_sink.messages) == 1


# -- expiry ----------------------------------------------------------------------------------


def test_deferral_past_the_apps_max_age_fails_as_expired(
    start_postbode: StartPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    with store.write() as conn:  # the next retry (in 45-60 s) would be past the app's limit
        conn.execute(
            update(apps).where(apps.c.id == shop.app_id).values(max_message_age_seconds=30)
        )
    mx_sink.script.add(Rule.rcpt("late@dest.test", "451 4.3.0 Try again later"))
    postbode = start_postbode()
    send(postbode, shop, "late@dest.test")
    row = wait_status(store, "late@dest.test", "failed")
    assert row["attempts"] == 1 and row["last_reply"] == "451 4.3.0 Try again later"
    (failed,) = [d for t, d in events_of(store, "late@dest.test") if t == "delivery.failed"]
    assert failed["reason"] == "expired"


def test_queued_too_long_fails_as_expired_without_another_try(
    start_postbode: StartPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    mx_sink.script.add(Rule.rcpt("late@dest.test", "451 4.3.0 Try again later"))
    postbode = start_postbode()
    send(postbode, shop, "late@dest.test")
    wait_status(store, "late@dest.test", "deferred")
    with store.write() as conn:  # as if it had been deferred for four days
        conn.execute(
            update(deliveries)
            .where(deliveries.c.recipient == "late@dest.test")
            .values(first_queued_at=utcnow() - timedelta(days=4))
        )
    retry_now(postbode)
    row = wait_status(store, "late@dest.test", "failed")
    assert len(rcpt_replies(mx_sink, "late@dest.test")) == 1, "an expired delivery is not tried"
    assert row["attempts"] == 1 and "expired" in (row["last_reply"] or "")
    (failed,) = [d for t, d in events_of(store, "late@dest.test") if t == "delivery.failed"]
    assert failed["reason"] == "expired"


# -- TLS policy ------------------------------------------------------------------------------


def test_starttls_required_but_not_offered_is_a_soft_fail(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback(tls=False) as plain:
        dns_server.add_mx("dest.test", [(10, "mx1.dest.test")])
        dns_server.add_a("mx1.dest.test", plain.host)
        postbode = start_postbode(tls_policy="dest.test=require")
        send(postbode, shop, "alice@dest.test")
        row = wait_status(store, "alice@dest.test", "deferred")
        assert plain.replies(Stage.MAIL) == [], "nothing may be sent in plain text"
    (deferred,) = [d for t, d in events_of(store, "alice@dest.test") if t == "delivery.deferred"]
    assert deferred["reason"] == "STARTTLS required but not offered"
    (attempt,) = attempts_of(store, row["id"])
    assert "STARTTLS not offered" in attempt["transcript"] and attempt["tls_version"] is None
    assert row["last_reply"] == "STARTTLS required but not offered", WHY


# -- a bug while recording one outcome -----------------------------------------------------------


def test_a_failure_recording_one_outcome_parks_only_that_delivery(
    start_postbode: StartPostbode, shop: tenancy.NewApp, mx_sink: SmtpSink, store: Store
) -> None:
    # Both queued before the worker starts, so one claim takes them and one transaction
    # records them: the case where one bad outcome could drag the others down with it.
    raw = b"From: Shop <orders@shop.test>\r\nSubject: Hi\r\n\r\nYour order has shipped.\r\n"
    make_queued_message(store, shop.app_id, ["alice@dest.test"], raw)
    make_queued_message(store, shop.app_id, ["poison@dest.test"], raw)
    with events_refused_for(store, "poison@dest.test"):
        postbode = start_postbode()
        mx_sink.wait_for_sync(2, timeout=15)
        wait_for(
            lambda: {
                status_of(store, "alice@dest.test"),
                status_of(store, "poison@dest.test"),
            }.isdisjoint({"queued", "sending"}),
            what="both outcomes handled",
        )
        alice, poison = delivery(store, "alice@dest.test"), delivery(store, "poison@dest.test")
        assert postbode._tasks and not postbode._tasks[0].done(), "the worker goes on"
    # The poisoned delivery is parked whole, where the UI shows it, its error with it ...
    assert poison["status"] == "held" and "poisoned event" in (poison["error"] or "")
    assert attempts_of(store, poison["id"]) == [], "no half-recorded outcome"
    # ... and the other, delivered by the same connection, is recorded as delivered.
    assert alice["status"] == "delivered", (
        f"one delivery's recording failure parked the whole batch: alice is {alice['status']}"
    )
    assert [t for t, _ in events_of(store, "alice@dest.test")][-1] == "delivery.delivered"


# -- suppressed while it waited -------------------------------------------------------------------


def test_a_deferred_delivery_to_an_address_suppressed_since_ends_suppressed_unsent(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    store: Store,
) -> None:
    mx_sink.script.add(Rule.rcpt("gone@dest.test", "451 4.2.0 Mailbox busy, try again later"))
    postbode = start_postbode()
    send(postbode, shop, "gone@dest.test")
    wait_status(store, "gone@dest.test", "deferred")
    assert len(rcpt_replies(mx_sink, "gone@dest.test")) == 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette's TestClient prefers httpx2
        from fastapi.testclient import TestClient

    web = create_app(postbode.settings, store)
    with TestClient(web) as client:
        answer = client.post(
            "/api/v1/suppressions",
            json={"suppressions": [{"email": "gone@dest.test", "reason": "manual"}]},
            headers={"Authorization": f"Bearer {shop.api_key}"},
        )
        assert client.portal is not None
        client.portal.call(web.state.acceptor.close)
    assert answer.status_code in (200, 201), answer.text

    retry_now(postbode)
    row = wait_status(store, "gone@dest.test", "suppressed")
    assert row["last_reply"] == "suppressed: manual"
    assert row["attempts"] == 1  # no second attempt was made
    assert len(rcpt_replies(mx_sink, "gone@dest.test")) == 1, "nothing more reached the MX"
    assert [t for t, _ in events_of(store, "gone@dest.test")] == [
        "delivery.queued",
        "delivery.deferred",
        "delivery.suppressed",
    ]
    assert events_of(store, "gone@dest.test")[-1][1]["when"] == "before_attempt"
