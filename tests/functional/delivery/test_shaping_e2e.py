"""End to end: a destination that answers 421 is slowed down, its waiting deliveries say why,
and everything is delivered; a busy MX host makes deliveries wait for a connection."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import select

from postbode import tenancy
from postbode.delivery import manage
from postbode.store.engine import Store
from postbode.store.schema import attempts, deliveries, events
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import make_app, make_queued_message
from postbode.testing.servers import StartPostbode
from postbode.testing.sink import STALL, Rule, SmtpSink, Stage

THROTTLED = "421 4.7.0 Too many connections, slow down"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def rows(store: Store) -> dict[str, Any]:
    with store.read() as conn:
        return {r.recipient: r for r in conn.execute(select(deliveries))}


def slowdowns(domain: str) -> float:
    value = REGISTRY.get_sample_value("postbode_shaping_slowdowns_total", {"domain": domain})
    return value or 0.0


def waits(domain: str, limit: str) -> float:
    labels = {"domain": domain, "limit": limit}
    return REGISTRY.get_sample_value("postbode_shaping_waits_total", labels) or 0.0


def test_421_slows_the_destination_down_and_the_waiting_deliveries_say_why(
    start_postbode: StartPostbode, store: Store, mx_sink: SmtpSink, dns_server: LoopbackDNS
) -> None:
    shop = tenancy.create_app(store, "shop")
    domain = tenancy.add_domain(store, "shop", "shop.test")
    dns_server.add_txt(f"{domain['dkim_selector']}._domainkey.shop.test", domain["dkim_public_key"])
    # The first connection is refused with 421; the ones after it are served.
    mx_sink.script.add(Rule.connect(THROTTLED, "220 mx1.dest.test ESMTP"))
    before = slowdowns("dest.test"), waits("dest.test", "rate")
    # 120/min, one at a time: after halving, one a second.
    postbode = start_postbode(shaping_rules="dest.test=rate:120,burst:1")
    recipients = [f"{name}@dest.test" for name in ("ann", "bob", "cat", "dan")]

    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = "Your order"
    msg.set_content("Shipped.")
    with smtplib.SMTP(postbode.host, postbode.port) as client:
        client.login(shop.smtp_username, shop.smtp_password)
        client.send_message(msg)

    # The first went out and met the 421; the others were never tried on that connection
    # and wait for slots at the lowered rate, saying so where the queue view shows it.
    lowered = "waiting: rate limit for dest.test (60/min, lowered after 421 4.7.0 at "

    def waiting_says_why() -> bool:
        return any((r.last_reply or "").startswith(lowered) for r in rows(store).values())

    wait_for(waiting_says_why)
    page, _ = manage.list_deliveries(store, shop.app_id, status=["deferred"])
    shown = [d for d in page if (d["last_reply"] or "").startswith(lowered)]
    assert shown and all(d["attempts"] == 0 and d["next_attempt_at"] for d in shown)
    assert postbode.worker.outgoing.shaper.limits("dest.test").rate_per_minute == 60
    assert slowdowns("dest.test") == before[0] + 1
    assert waits("dest.test", "rate") >= before[1] + 3

    # The one that met the 421 is deferred with the remote's reply and the usual backoff.
    (first,) = [r for r in rows(store).values() if r.last_reply == THROTTLED]
    assert first.status == "deferred" and first.attempts == 1
    others = [r for r in recipients if r != first.recipient]
    wait_for(lambda: all(rows(store)[r].status == "delivered" for r in others))

    # Retried by hand, it waits for its own slot like any other, then goes.
    manage.retry(store, shop.app_id, first.id, by="test")
    postbode.worker.notify()
    wait_for(lambda: all(r.status == "delivered" for r in rows(store).values()))
    assert sorted(m.rcpt_tos[0] for m in mx_sink.messages) == sorted(recipients)
    assert mx_sink.replies(Stage.CONNECT)[0] == THROTTLED

    with store.read() as conn:
        started = {
            r: t
            for r, t in conn.execute(
                select(deliveries.c.recipient, attempts.c.started_at)
                .join(attempts, attempts.c.delivery_id == deliveries.c.id)
                .where(attempts.c.outcome == "Delivered")
            )
        }
        throttled_at = conn.execute(
            select(attempts.c.started_at).where(attempts.c.reply_code == 421)
        ).scalar_one()
        types = conn.execute(select(events.c.type)).scalars().all()
    # Each waiting delivery went at its slot, a second apart at the lowered rate (at 120/min
    # the three would have gone within a second and a half).
    gaps = sorted((started[r] - throttled_at).total_seconds() for r in others)
    assert all(gap >= slot - 0.1 for slot, gap in zip((1, 2, 3), gaps, strict=True)), gaps
    # A shaping wait is no event: one delivery.deferred (the 421), one retry by hand.
    assert types.count("delivery.deferred") == 1
    assert types.count("delivery.queued") == len(recipients)
    assert types.count("delivery.retried") == 1
    assert types.count("delivery.delivered") == len(recipients)


def test_a_busy_mx_host_makes_deliveries_wait_for_a_connection(
    start_postbode: StartPostbode, store: Store, mx_sink: SmtpSink
) -> None:
    # Two apps' mail for one domain is sent by two tasks at once; the MX host takes one
    # connection from us. The first connection stalls at the greeting until our 1 s timeout,
    # so the second task finds the host busy for certain.
    one, two = make_app(store), make_app(store)
    _, (first,) = make_queued_message(store, one.app_id, ["a@dest.test"])
    _, (second,) = make_queued_message(store, two.app_id, ["b@dest.test"])
    mx_sink.script.add(Rule.connect(STALL, "220 mx1.dest.test ESMTP"))
    postbode = start_postbode(
        shaping_rules="dest.test=conn:1",
        shaping_max_wait_seconds=0.0,
        smtp_command_timeout=1.0,
    )

    before = waits("dest.test", "connections")
    busy = "waiting: connection limit for mx1.dest.test (1 connection busy)"
    wait_for(lambda: {r.last_reply for r in rows(store).values()} >= {busy})
    waiting = next(r for r in rows(store).values() if r.last_reply == busy)
    assert waiting.status == "deferred" and waiting.attempts == 0
    assert waits("dest.test", "connections") == before + 1

    # The stalled attempt times out and is deferred with the usual backoff; the waiting one
    # would look again in a few seconds. Made due now one after the other (together, one
    # would find the host busy again), the free host serves them.
    def both_deferred_one_tried() -> bool:
        now = rows(store).values()
        return all(r.status == "deferred" for r in now) and any(r.attempts == 1 for r in now)

    wait_for(both_deferred_one_tried)
    assert mx_sink.replies(Stage.CONNECT) == [None]  # one connection only: the stalled one
    for app, delivery in ((one, first), (two, second)):
        manage.retry(store, app.app_id, delivery)
        postbode.worker.notify()
        wait_for(
            lambda d=delivery: {r.id: r for r in rows(store).values()}[d].status == "delivered"
        )
    assert sorted(m.rcpt_tos[0] for m in mx_sink.messages) == ["a@dest.test", "b@dest.test"]
