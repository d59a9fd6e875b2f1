"""Events, their counters and their webhook outbox rows commit together or not at all."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from postbode.events.record import Event, Tally, minute, prepare_record, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import events, stat_counters, webhook_requests
from postbode.testing.factories import make_app, make_queued_message
from postbode.webhooks import manage


class Boom(Exception):
    pass


def _counts(store: Store) -> tuple[int, int, int]:
    with store.read() as conn:
        return (
            conn.execute(select(func.count()).select_from(events)).scalar_one(),
            conn.execute(select(func.coalesce(func.sum(stat_counters.c.count), 0))).scalar_one(),
            conn.execute(select(func.count()).select_from(webhook_requests)).scalar_one(),
        )


def test_a_rolled_back_event_leaves_no_webhook_and_no_counter(store: Store) -> None:
    app = make_app(store)
    manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    message_id, (delivery_id,) = make_queued_message(store, app.app_id, ["alice@dest.test"])
    event = Event(
        app_id=app.app_id,
        type=EventType.DELIVERY_DELIVERED,
        message_id=message_id,
        delivery_id=delivery_id,
        recipient="alice@dest.test",
    )
    with pytest.raises(Boom), store.write() as conn:
        record(conn, event)
        assert conn.execute(select(func.count()).select_from(webhook_requests)).scalar_one() == 1
        raise Boom  # the state change this event belongs to failed
    assert _counts(store) == (0, 0, 0)

    with store.write() as conn:  # the same event, committed this time
        record(conn, event)
    assert _counts(store) == (1, 1, 1)


def test_counters_count_bots_apart_and_webhooks_follow_their_filters(store: Store) -> None:
    app = make_app(store)
    bounces = manage.create_webhook(store, app.app_id, "https://a.test/", ["delivery.bounced"])
    opens = manage.create_webhook(store, app.app_id, "https://b.test/", ["message.opened"])
    manage.update_webhook(
        store,
        app.app_id,
        manage.create_webhook(store, app.app_id, "https://c.test/")["id"],
        enabled=False,
    )
    batch = [
        Event(app_id=app.app_id, type=EventType.MESSAGE_OPENED, tag="welcome", bot=True),
        Event(app_id=app.app_id, type=EventType.MESSAGE_OPENED, tag="welcome"),
        Event(app_id=app.app_id, type=EventType.MESSAGE_OPENED, tag="welcome", bot=True),
    ]
    with store.write() as conn:
        record(conn, batch)
    with store.read() as conn:
        counter = conn.execute(select(stat_counters)).one()
        hooks = conn.execute(select(webhook_requests.c.webhook_id)).scalars().all()
    assert (counter.event_type, counter.tag, counter.count, counter.bot_count) == (
        "message.opened",
        "welcome",
        3,
        2,
    )
    assert counter.bucket == minute(batch[0].at)
    assert hooks == [opens["id"]] * 3  # not the bounce-only hook, not the disabled one
    assert bounces["id"] not in hooks


def test_a_tally_gathers_increments_over_records_and_bumps_each_counter_row_once(
    store: Store,
) -> None:
    app = make_app(store)
    other = make_app(store)
    tally = Tally()
    with store.write() as conn:
        for _ in range(3):
            record(conn, Event(app_id=app.app_id, type=EventType.DELIVERY_DELIVERED), tally)
        record(
            conn,
            [
                Event(app_id=app.app_id, type=EventType.MESSAGE_OPENED, tag="t", bot=True),
                Event(app_id=other.app_id, type=EventType.DELIVERY_DELIVERED),
            ],
            counters=tally,
        )
        # Events are written at once; their counters wait for bump().
        assert conn.execute(select(func.count()).select_from(events)).scalar_one() == 5
        assert conn.execute(select(func.count()).select_from(stat_counters)).scalar_one() == 0
        tally.bump(conn)
        tally.bump(conn)  # bumped increments are forgotten: a second bump adds nothing
    with store.write() as conn:  # and later increments add to the same rows
        record(conn, Event(app_id=app.app_id, type=EventType.DELIVERY_DELIVERED))
    with store.read() as conn:
        rows = conn.execute(
            select(
                stat_counters.c.app_id,
                stat_counters.c.tag,
                stat_counters.c.event_type,
                stat_counters.c.count,
                stat_counters.c.bot_count,
            )
        ).all()
    assert sorted(tuple(r) for r in rows) == sorted(
        [
            (app.app_id, "", "delivery.delivered", 4, 0),
            (app.app_id, "t", "message.opened", 1, 1),
            (other.app_id, "", "delivery.delivered", 1, 0),
        ]
    )


def test_prepared_events_are_recorded_as_record_records_them(store: Store) -> None:
    app = make_app(store)
    manage.create_webhook(store, app.app_id, "https://a.test/", ["delivery.queued"])
    message_id, (delivery_id,) = make_queued_message(store, app.app_id, ["alice@dest.test"])

    def batch() -> list[Event]:
        return [
            Event(
                app_id=app.app_id,
                type=EventType.DELIVERY_QUEUED,
                tag="welcome",
                message_id=message_id,
                delivery_id=delivery_id,
                recipient="alice@dest.test",
                data={"send_at": "2026-12-24T18:00:00+00:00", "ü": ["ß"]},
            ),
            Event(app_id=app.app_id, type=EventType.MESSAGE_OPENED, bot=True, tag="welcome"),
            Event(app_id=app.app_id, type=EventType.MESSAGE_CLICKED, counted=False),
        ]

    theirs, ours = batch(), batch()
    with store.write() as conn:
        record(conn, theirs)
    prepared = prepare_record(store.engine.dialect, ours)  # outside any transaction
    with store.write() as conn:
        prepared.write(conn)
    with store.read() as conn:
        rows = {r.id: r._asdict() for r in conn.execute(select(events))}
        counters = conn.execute(
            select(
                stat_counters.c.tag,
                stat_counters.c.event_type,
                stat_counters.c.count,
                stat_counters.c.bot_count,
            )
        ).all()
        hooks = conn.execute(select(webhook_requests.c.event_id)).scalars().all()
    for mine, reference in zip(ours, theirs, strict=True):
        got, expected = dict(rows[mine.id]), dict(rows[reference.id])
        del got["id"], expected["id"]
        assert (got.pop("created_at"), expected.pop("created_at")) == (mine.at, reference.at)
        assert got == expected
    # each counter row was bumped by both (the second an upsert onto the first's row)
    assert sorted(tuple(c) for c in counters) == [
        ("welcome", "delivery.queued", 2, 0),
        ("welcome", "message.opened", 2, 2),
    ]
    assert sorted(hooks) == sorted([ours[0].id, theirs[0].id])  # only the hook's type


def test_bounces_bump_their_category_counter_in_the_same_transaction(store: Store) -> None:
    """Each delivery.bounced event bumps bounce_counters (its category and hardness) with the
    event, or not at all; the dashboard's bounce reasons then say what the events say."""
    from collections import Counter
    from datetime import timedelta

    from postbode.bounces.classify import CATEGORIES
    from postbode.stats import queries
    from postbode.store.schema import bounce_counters, utcnow

    app = make_app(store).app_id
    message_id, _ = make_queued_message(store, app, ["alice@dest.test"])
    now = utcnow()

    def bounce(category: str | None, hard: bool | None, ago: int) -> Event:
        data = {} if category is None else {"category": category, "hard": hard}
        return Event(
            app_id=app,
            type=EventType.DELIVERY_BOUNCED,
            tag="welcome" if ago % 2 else None,
            message_id=message_id,
            at=now - timedelta(minutes=ago),
            data=data,
        )

    batch = [
        bounce(category, (i + k) % 3 == 0, ago=i * 7 + k)
        for i, category in enumerate(CATEGORIES)
        for k in range(i % 4 + 1)
    ] + [bounce(None, None, 3), Event(app_id=app, type=EventType.DELIVERY_DELIVERED, at=now)]
    with pytest.raises(Boom), store.write() as conn:
        record(conn, batch)
        raise Boom
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(bounce_counters)).scalar_one() == 0
    third = len(batch) // 3
    tally = Tally()
    with store.write() as conn:  # a third through a tally bumped at the end, as the worker does
        record(conn, batch[:third])
        record(conn, batch[third : 2 * third], tally)
        tally.bump(conn)
    prepared = prepare_record(store.engine.dialect, batch[2 * third :])  # as accept does
    with pytest.raises(Boom), store.write() as conn:
        prepared.write(conn)
        raise Boom
    with store.write() as conn:
        prepared.write(conn)

    with store.read() as conn:
        said = [
            (e.data.get("category") or "unknown", bool(e.data.get("hard")))
            for e in conn.execute(select(events).where(events.c.type == "delivery.bounced"))
        ]
    by_category = Counter(c for c, _ in said)
    hard = Counter(c for c, h in said if h)
    reasons = queries.top_bounce_reasons(store, [app], "24h", limit=100)
    assert {r.category: (r.count, r.hard) for r in reasons} == {
        c: (n, hard[c]) for c, n in by_category.items()
    }
    assert {r.category for r in reasons} == {*CATEGORIES, "unknown"}
    assert [r.count for r in reasons] == sorted((r.count for r in reasons), reverse=True)
    welcome = queries.top_bounce_reasons(store, [app], "24h", tag="welcome", limit=100)
    assert sum(r.count for r in welcome) == sum(1 for e in batch[:-1] if e.tag == "welcome")
