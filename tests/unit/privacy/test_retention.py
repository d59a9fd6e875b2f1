"""Retention with the clock moved forward: bodies go after the body window, addresses become
keyed hashes after the metadata window, held and deferred mail keeps both until it ends,
statistics stay as they were, apps that store no bodies lose them once delivery ended."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.privacy.audit import Actor, write_audit
from postbode.privacy.hashing import address_key, hash_address, is_hashed
from postbode.privacy.retention import purge
from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    attempts,
    audit_log,
    deliveries,
    events,
    idempotency_keys,
    inbound_messages,
    messages,
    new_id,
    raw_messages,
    stat_counters,
    utcnow,
)
from postbode.testing.factories import make_app, make_queued_message


def _no_rest(_: float) -> None:
    pass


def _finish(store: Store, delivery_id: Any, status: str, recipient: str, app_id: int) -> None:
    """The delivery ends (or waits) as a worker would leave it: status, attempt, event."""
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(status=status, attempts=1, last_reply=f"250 ok <{recipient}>")
        )
        conn.execute(
            insert(attempts).values(
                id=new_id(),
                delivery_id=delivery_id,
                started_at=utcnow(),
                outcome="Delivered",
                transcript=f"RCPT TO:<{recipient}>",
            )
        )
        message_id = conn.execute(
            select(deliveries.c.message_id).where(deliveries.c.id == delivery_id)
        ).scalar_one()
        kind = {
            "delivered": EventType.DELIVERY_DELIVERED,
            "bounced": EventType.DELIVERY_BOUNCED,
            "deferred": EventType.DELIVERY_DEFERRED,
            "held": EventType.DELIVERY_HELD,
        }[status]
        data: dict[str, Any] = {"reply": f"250 ok <{recipient}>"}
        if status == "bounced":
            data = {
                "category": "user_unknown",
                "hard": True,
                "status": "5.1.1",
                "diagnostic": f"550 <{recipient}> unknown",
            }
        record(
            conn,
            Event(
                app_id=app_id,
                type=kind,
                message_id=message_id,
                delivery_id=delivery_id,
                recipient=recipient,
                data=data,
            ),
        )


def _counters(store: Store) -> list[Any]:
    with store.read() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(stat_counters).order_by(*stat_counters.primary_key.columns)
            )
        ]


def _state(store: Store, message_id: Any) -> tuple[bool, list[str]]:
    with store.read() as conn:
        body = conn.execute(
            select(func.count()).where(raw_messages.c.message_id == message_id)
        ).scalar_one()
        recipients = list(
            conn.execute(
                select(deliveries.c.recipient).where(deliveries.c.message_id == message_id)
            ).scalars()
        )
    return body == 1, recipients


def test_bodies_then_addresses_go_and_waiting_mail_keeps_both(store: Store) -> None:
    app = make_app(store)
    done, (d1,) = make_queued_message(store, app.app_id, ["ann@x.test"])
    bounced, (d2,) = make_queued_message(store, app.app_id, ["bob@x.test"])
    held, (d3,) = make_queued_message(store, app.app_id, ["cy@x.test"])
    deferred, (d4,) = make_queued_message(store, app.app_id, ["di@x.test"])
    _finish(store, d1, "delivered", "ann@x.test", app.app_id)
    _finish(store, d2, "bounced", "bob@x.test", app.app_id)
    _finish(store, d3, "held", "cy@x.test", app.app_id)
    _finish(store, d4, "deferred", "di@x.test", app.app_id)
    with store.write() as conn:
        conn.execute(
            insert(idempotency_keys).values(
                app_id=app.app_id, key="k1", body_hash="x", response={"to": "ann@x.test"}
            )
        )
    stats = _counters(store)
    start = utcnow()

    first = purge(store, now=start + timedelta(days=6), pause=_no_rest)
    assert first.bodies == 0 and _state(store, done) == (True, ["ann@x.test"])

    week = purge(store, now=start + timedelta(days=8), pause=_no_rest)
    assert week.bodies == 2 and week.messages_hashed == 0
    assert _state(store, done) == (False, ["ann@x.test"])
    assert _state(store, bounced) == (False, ["bob@x.test"])
    assert _state(store, held) == (True, ["cy@x.test"])  # not ended: body kept
    assert _state(store, deferred) == (True, ["di@x.test"])
    with store.read() as conn:
        purged = conn.execute(
            select(messages.c.raw_purged_at).where(messages.c.id == done)
        ).scalar_one()
    assert purged is not None

    later = start + timedelta(days=91)
    quarter = purge(store, now=later, pause=_no_rest)
    assert quarter.complete and quarter.messages_hashed == 2 and quarter.deliveries_hashed == 2
    assert quarter.idempotency_records == 1
    key = address_key(store)
    assert _state(store, done) == (False, [hash_address(key, "ann@x.test")])
    assert _state(store, bounced) == (False, [hash_address(key, "bob@x.test")])
    assert _state(store, held) == (True, ["cy@x.test"])
    assert _state(store, deferred) == (True, ["di@x.test"])
    with store.read() as conn:
        ended = [d1, d2]
        assert (
            conn.execute(select(func.count()).where(attempts.c.delivery_id.in_(ended))).scalar_one()
            == 0
        )
        replies = (
            conn.execute(select(deliveries.c.last_reply).where(deliveries.c.id.in_(ended)))
            .scalars()
            .all()
        )
        assert replies == [None, None]
        left = conn.execute(select(events.c.type, events.c.recipient, events.c.data)).all()
        subject = conn.execute(select(messages.c.subject).where(messages.c.id == done)).scalar()
    # only the bounce stays (the bounce statistics read it), hashed and without diagnostic
    assert [(e.type, is_hashed(e.recipient), e.data) for e in left] == [
        ("delivery.bounced", True, {"category": "user_unknown", "hard": True, "status": "5.1.1"})
    ]
    assert subject == ""
    assert _counters(store) == stats  # statistics for the period unchanged

    again = purge(store, now=later, pause=_no_rest)  # nothing left to do: nothing done
    assert (again.bodies, again.messages_hashed, again.events) == (0, 0, 0)

    # once the held and deferred mail ends, its turn comes
    with store.write() as conn:
        conn.execute(
            update(deliveries).where(deliveries.c.id.in_([d3, d4])).values(status="cancelled")
        )
    purge(store, now=later, pause=_no_rest)
    assert _state(store, held) == (False, [hash_address(key, "cy@x.test")])
    assert _state(store, deferred) == (False, [hash_address(key, "di@x.test")])


def test_an_app_that_stores_no_bodies_loses_them_as_delivery_ends(store: Store) -> None:
    app = make_app(store)
    with store.write() as conn:
        conn.execute(update(apps).where(apps.c.id == app.app_id).values(store_bodies=False))
    sent, (d1,) = make_queued_message(store, app.app_id, ["ann@x.test"])
    waiting, _ = make_queued_message(store, app.app_id, ["bob@x.test"])
    _finish(store, d1, "delivered", "ann@x.test", app.app_id)
    report = purge(store, pause=_no_rest)
    assert report.bodies == 1
    assert _state(store, sent)[0] is False and _state(store, waiting)[0] is True


def test_small_batches_go_on_until_done_and_audit_has_its_own_window(store: Store) -> None:
    app = make_app(store)
    ids = []
    for i in range(7):
        message_id, (d,) = make_queued_message(store, app.app_id, [f"p{i}@x.test"])
        _finish(store, d, "delivered", f"p{i}@x.test", app.app_id)
        ids.append(message_id)
    with store.write() as conn:
        org = conn.execute(
            select(apps.c.organization_id).where(apps.c.id == app.app_id)
        ).scalar_one()
        write_audit(conn, Actor("cli"), "privacy.export", "x", organization_id=org)
    rests: list[float] = []
    report = purge(store, now=utcnow() + timedelta(days=100), batch=3, pause=rests.append)
    assert report.messages_hashed == 7 and report.batches >= 3
    assert len(rests) >= 3  # a rest after every batch that did something
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(audit_log)).scalar_one() == 1
    later = purge(store, now=utcnow() + timedelta(days=366), pause=_no_rest)
    assert later.audit_records == 1


def test_events_of_one_instant_are_all_looked_at_once(store: Store) -> None:
    app = make_app(store)
    at = utcnow()
    kinds = [
        EventType.DELIVERY_BOUNCED if i % 3 == 0 else EventType.DELIVERY_DELIVERED for i in range(8)
    ]
    with store.write() as conn:  # written together, as a batch of outcomes is: one instant
        record(
            conn,
            [
                Event(
                    app_id=app.app_id,
                    type=k,
                    recipient=f"p{i}@x.test",
                    at=at,
                    data={"category": "user_unknown", "diagnostic": "550 <p@x.test>"},
                )
                for i, k in enumerate(kinds)
            ],
        )
    report = purge(store, now=at + timedelta(days=91), batch=3, pause=_no_rest)
    assert (report.events, report.events_reduced) == (5, 3)
    with store.read() as conn:
        left = conn.execute(select(events.c.recipient, events.c.data)).all()
    assert len(left) == 3 and all(is_hashed(r.recipient) for r in left)
    assert all(r.data == {"category": "user_unknown"} for r in left)
    again = purge(store, now=at + timedelta(days=92), batch=3, pause=_no_rest)
    assert (again.events, again.events_reduced) == (0, 0)  # the kept ones are not revisited


def test_a_failed_delivery_whose_body_went_cannot_be_retried(store: Store) -> None:
    from postbode.delivery import manage

    app = make_app(store)
    _, (d1,) = make_queued_message(store, app.app_id, ["ann@x.test"])
    _, (d2,) = make_queued_message(store, app.app_id, ["bob@x.test"])
    with store.write() as conn:
        conn.execute(update(deliveries).values(status="failed"))
    purge(store, now=utcnow() + timedelta(days=8), pause=_no_rest)
    with pytest.raises(manage.WrongState, match="body was removed"):
        manage.retry(store, app.app_id, d1)
    where = manage.DeliveryFilter(status=["failed"])
    assert manage.change_many(store, app.app_id, "retry", where) == 0
    with store.read() as conn:
        assert set(conn.execute(select(deliveries.c.status)).scalars()) == {"failed"}
    assert d2


def test_inbound_mail_keeps_its_source_while_pending_or_held(store: Store) -> None:
    app = make_app(store)
    received = utcnow() - timedelta(days=8)  # past the body window, inside the metadata window
    rows = {}
    with store.write() as conn:
        for status in ("pending", "held", "delivered"):
            rows[status] = conn.execute(
                insert(inbound_messages)
                .values(
                    app_id=app.app_id,
                    status=status,
                    mail_from="ann@x.test",
                    rcpt_to="support@app.test",
                    raw=b"x" * 40,
                    received_at=received,
                    queued_at=received,
                )
                .returning(inbound_messages.c.id)
            ).scalar_one()
    purge(store, pause=_no_rest)
    with store.read() as conn:
        size = dict(
            conn.execute(
                select(inbound_messages.c.status, func.length(inbound_messages.c.raw))
            ).all()
        )
    assert size == {"pending": 40, "held": 40, "delivered": 0}
    purge(store, now=utcnow() + timedelta(days=90), pause=_no_rest)
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(inbound_messages)).scalar() == 0
