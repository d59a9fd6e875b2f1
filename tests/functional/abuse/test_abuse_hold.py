"""End to end: a held app's new and queued mail waits, an alert still reaches the owners, a
cancelled delivery never goes out, a release sends the rest, and the audit log names who."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import select

from postbode import tenancy
from postbode.abuse import alerts, hold
from postbode.abuse.release import release
from postbode.delivery import manage
from postbode.store.engine import Store
from postbode.store.schema import audit_log, deliveries, events
from postbode.testing.factories import make_queued_message
from postbode.testing.servers import StartPostbode, send
from postbode.testing.sink import SmtpSink


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def by_recipient(store: Store) -> dict[str, tuple[str, str | None]]:
    with store.read() as conn:
        rows = conn.execute(
            select(deliveries.c.recipient, deliveries.c.status, deliveries.c.last_reply)
        )
        return {r.recipient: (r.status, r.last_reply) for r in rows}


def test_a_held_app_sends_nothing_until_released(
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    start_postbode: StartPostbode,
) -> None:
    tenancy.create_user(store, "owner@dest.test", "a long password 1", role="owner")
    tenancy.create_user(store, "viewer@dest.test", "a long password 2", role="viewer")
    postbode = start_postbode()
    send(postbode, shop, "before@dest.test")
    mx_sink.wait_for_sync(1)

    assert hold.hold(store, shop.app_id, "leaked key?", hold.Actor("ops@shop.test"))
    assert not hold.hold(store, shop.app_id, "again", hold.Actor("ops@shop.test"))
    send(postbode, shop, "new1@dest.test")
    send(postbode, shop, "new2@dest.test")
    # queued without the accept path (as mail queued before the hold): the worker holds it
    make_queued_message(store, shop.app_id, ["queued@dest.test"])
    wait_for(lambda: by_recipient(store).get("queued@dest.test", ("",))[0] == "held")
    found = by_recipient(store)
    assert found["new1@dest.test"] == ("held", "app held: leaked key?")
    assert found["new2@dest.test"] == ("held", "app held: leaked key?")
    assert found["queued@dest.test"] == ("held", "app held: leaked key?")

    # An alert about it reaches the owner (not the viewer), though the app is held.
    alert_id = alerts.raise_alert(
        store, shop.app_id, "spike", {"rate": 300, "baseline": 2}, held=True
    )
    assert alert_id is not None
    got = mx_sink.wait_for_sync(2)
    assert got[1].rcpt_tos == ("owner@dest.test",)
    assert "spike" in str(got[1].message["Subject"])
    assert "held" in got[1].message.get_content()
    assert alerts.raise_alert(store, shop.app_id, "spike", {"rate": 400}) is None  # once an hour

    with store.read() as conn:
        new2 = conn.execute(
            select(deliveries.c.id).where(deliveries.c.recipient == "new2@dest.test")
        ).scalar_one()
    manage.cancel(store, shop.app_id, new2, by="ops@shop.test")
    time.sleep(0.5)  # the worker polls every 0.25 s: it would have sent held mail by now
    assert len(mx_sink.messages) == 2

    released = release(store, shop.app_id, hold.Actor("owner@dest.test"))
    assert released == 2
    mx_sink.wait_for_sync(4)
    wait_for(lambda: by_recipient(store)["queued@dest.test"][0] == "delivered")
    sent = sorted(r for m in mx_sink.messages for r in m.rcpt_tos)
    assert sent == ["before@dest.test", "new1@dest.test", "owner@dest.test", "queued@dest.test"]
    assert by_recipient(store)["new2@dest.test"][0] == "cancelled"

    with store.read() as conn:
        audit = conn.execute(
            select(audit_log.c.actor, audit_log.c.action, audit_log.c.data).order_by(audit_log.c.id)
        ).all()
        types = list(conn.execute(select(events.c.type).where(events.c.type == "app.alert")))
    assert [(a.actor, a.action) for a in audit] == [
        ("ops@shop.test", "app.hold"),
        ("owner@dest.test", "app.release"),
    ]
    assert audit[0].data["reason"] == "leaked key?"
    assert len(types) == 1
