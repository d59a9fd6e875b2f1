"""Queue management on both dialects: retry, cancel, release (one and in bulk), list, summary."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode.delivery import manage
from postbode.delivery.manage import BadFilter, DeliveryFilter, NotFound, WrongState
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages, stat_counters, utcnow
from postbode.testing.factories import make_app, make_queued_message


def queue(store: Store, app_id: int, recipients: list[str], tag: str | None = None) -> list[Any]:
    message_id, ids = make_queued_message(store, app_id, recipients)
    if tag is not None:
        with store.write() as conn:
            conn.execute(update(messages).where(messages.c.id == message_id).values(tag=tag))
    return ids


def set_row(store: Store, delivery_id: uuid.UUID, **values: Any) -> None:
    with store.write() as conn:
        conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(**values))


def row(store: Store, delivery_id: uuid.UUID) -> Any:
    with store.read() as conn:
        return conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).one()


def events_of(store: Store, delivery_id: uuid.UUID | None = None) -> list[Any]:
    query = select(events).order_by(events.c.id)
    if delivery_id is not None:
        query = query.where(events.c.delivery_id == delivery_id)
    with store.read() as conn:
        return list(conn.execute(query).all())


# -- one delivery -----------------------------------------------------------------------------


def test_retry_makes_a_deferred_delivery_due_now_with_its_event(store: Store) -> None:
    app = make_app(store)
    (d,) = queue(store, app.app_id, ["a@dest.test"], tag="welcome")
    with store.write() as conn:  # made from a template
        mine = select(deliveries.c.message_id).where(deliveries.c.id == d)
        conn.execute(update(messages).where(messages.c.id.in_(mine)).values(template="hello"))
    later = utcnow() + timedelta(hours=1)
    set_row(store, d, status="deferred", next_attempt_at=later, last_reply="451 4.7.1 Later")

    before = utcnow()
    view = manage.retry(store, app.app_id, d, by="ops@shop.test")

    assert view["status"] == "queued" and view["last_reply"] == "451 4.7.1 Later"
    assert before <= view["next_attempt_at"] <= utcnow()
    r = row(store, d)
    assert (r.status, r.lease_owner, r.lease_until) == ("queued", None, None)
    (event,) = events_of(store, d)
    assert event.type == "delivery.retried"
    assert event.data == {"action": "retry", "previous_status": "deferred", "by": "ops@shop.test"}
    # Counted with the message's tag and template, in the same transaction.
    with store.read() as conn:
        counted = conn.execute(
            select(
                stat_counters.c.event_type,
                stat_counters.c.tag,
                stat_counters.c.template,
                stat_counters.c.count,
            )
        ).all()
    # counted as a retry, not as another recipient taken in (delivery.queued)
    assert counted == [("delivery.retried", "welcome", "hello", 1)]


def test_retry_gives_a_failed_delivery_a_fresh_max_age(store: Store) -> None:
    app = make_app(store)
    (d,) = queue(store, app.app_id, ["a@dest.test"])
    long_ago = utcnow() - timedelta(days=5)
    set_row(store, d, status="failed", first_queued_at=long_ago, attempts=9)
    manage.retry(store, app.app_id, d)
    r = row(store, d)
    assert r.status == "queued" and r.attempts == 9
    assert r.first_queued_at > long_ago + timedelta(days=4)


def test_retrying_or_releasing_a_held_delivery_is_a_release(store: Store) -> None:
    app = make_app(store)
    a, b = queue(store, app.app_id, ["a@dest.test", "b@dest.test"])
    set_row(store, a, status="held", error="Traceback …")
    set_row(store, b, status="held")
    manage.retry(store, app.app_id, a)
    manage.release(store, app.app_id, b)
    assert row(store, a).status == row(store, b).status == "queued"
    assert row(store, a).error is None  # the parked bug's traceback goes with the hold
    assert [e.type for e in events_of(store)] == ["delivery.released", "delivery.released"]
    assert [e.data["action"] for e in events_of(store)] == ["retry", "release"]


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("retry", "delivered"),
        ("retry", "bounced"),
        ("retry", "queued"),
        ("retry", "cancelled"),
        ("retry", "suppressed"),
        ("retry", "sending"),
        ("cancel", "delivered"),
        ("cancel", "failed"),
        ("cancel", "sending"),
        ("release", "deferred"),
        ("release", "queued"),
    ],
)
def test_a_change_the_state_does_not_allow_is_refused(
    store: Store, action: manage.ActionName, status: str
) -> None:
    app = make_app(store)
    (d,) = queue(store, app.app_id, ["a@dest.test"])
    set_row(store, d, status=status, lease_owner="w1" if status == "sending" else None)
    with pytest.raises(WrongState) as refused:
        manage.change_one(store, app.app_id, d, action)
    assert refused.value.status == status and refused.value.field == "status"
    assert status in refused.value.message
    assert row(store, d).status == status  # untouched: no lease taken from a worker
    assert events_of(store) == []


def test_another_apps_delivery_is_not_found(store: Store) -> None:
    mine, theirs = make_app(store), make_app(store)
    (d,) = queue(store, theirs.app_id, ["a@dest.test"])
    set_row(store, d, status="deferred")
    with pytest.raises(NotFound):
        manage.retry(store, mine.app_id, d)
    with pytest.raises(NotFound):
        manage.cancel(store, mine.app_id, uuid.uuid4())
    assert row(store, d).status == "deferred"


@pytest.mark.parametrize("status", ["queued", "deferred", "held"])
def test_cancel(store: Store, status: str) -> None:
    app = make_app(store)
    (d,) = queue(store, app.app_id, ["a@dest.test"])
    set_row(store, d, status=status)
    assert manage.cancel(store, app.app_id, d)["status"] == "cancelled"
    (event,) = events_of(store, d)
    assert event.type == "delivery.cancelled" and event.data["previous_status"] == status


# -- in bulk ------------------------------------------------------------------------------------


def test_bulk_retry_by_domain_skips_rows_being_sent_and_other_apps(store: Store) -> None:
    app, other = make_app(store), make_app(store)
    ids = queue(store, app.app_id, [f"r{i}@slow.test" for i in range(7)] + ["x@fast.test"])
    (theirs,) = queue(store, other.app_id, ["y@slow.test"])
    for d in [*ids, theirs]:
        set_row(store, d, status="deferred", next_attempt_at=utcnow() + timedelta(hours=1))
    set_row(store, ids[0], status="sending", lease_owner="w1")

    changed = manage.change_many(
        store, app.app_id, "retry", DeliveryFilter(recipient_domain="Slow.Test."), chunk=2
    )

    assert changed == 6
    assert [row(store, d).status for d in ids] == ["sending", *["queued"] * 6, "deferred"]
    assert row(store, ids[0]).lease_owner == "w1"
    assert row(store, theirs).status == "deferred"
    assert len(events_of(store)) == 6


def test_bulk_filters_combine(store: Store) -> None:
    app = make_app(store)
    old_tagged = queue(store, app.app_id, ["a@dest.test", "b@dest.test"], tag="digest")
    new_tagged = queue(store, app.app_id, ["c@dest.test"], tag="digest")
    old_other = queue(store, app.app_id, ["d@dest.test"], tag="reset")
    for d in [*old_tagged, *old_other]:
        set_row(store, d, first_queued_at=utcnow() - timedelta(hours=2))

    changed = manage.change_many(
        store,
        app.app_id,
        "cancel",
        DeliveryFilter(status=["queued"], tag="digest", older_than_seconds=3600),
    )
    assert changed == 2
    assert [row(store, d).status for d in old_tagged] == ["cancelled", "cancelled"]
    assert row(store, new_tagged[0]).status == "queued"
    assert row(store, old_other[0]).status == "queued"


def test_bulk_by_ids(store: Store) -> None:
    app = make_app(store)
    a, b, c = queue(store, app.app_id, ["a@d.test", "b@d.test", "c@d.test"])
    for d in (a, b, c):
        set_row(store, d, status="held")
    assert manage.change_many(store, app.app_id, "release", DeliveryFilter(ids=[a, c])) == 2
    assert [row(store, d).status for d in (a, b, c)] == ["queued", "held", "queued"]
    assert manage.change_many(store, app.app_id, "release", DeliveryFilter(ids=[])) == 0


def test_bulk_in_many_chunks_changes_every_row_once(store: Store) -> None:
    app = make_app(store)
    ids = queue(store, app.app_id, [f"r{i}@dest.test" for i in range(1203)])
    changed = manage.change_many(store, app.app_id, "cancel", DeliveryFilter(status=["queued"]))
    assert changed == 1203
    with store.read() as conn:
        statuses = set(conn.execute(select(deliveries.c.status)).scalars())
        cancelled = conn.execute(
            select(events.c.delivery_id).where(events.c.type == "delivery.cancelled")
        ).scalars()
        assert sorted(cancelled) == sorted(ids)
    assert statuses == {"cancelled"}


def test_bulk_refuses_an_empty_filter_and_states_the_action_does_not_apply_to(
    store: Store,
) -> None:
    app = make_app(store)
    queue(store, app.app_id, ["a@dest.test"])
    with pytest.raises(BadFilter, match="at least one"):
        manage.change_many(store, app.app_id, "cancel", DeliveryFilter())
    applies = "cancel applies to scheduled, queued, deferred or held"
    with pytest.raises(BadFilter, match=applies) as bad:
        manage.change_many(store, app.app_id, "cancel", DeliveryFilter(status=["delivered"]))
    assert bad.value.field == "status"
    assert events_of(store) == []


# -- the queue view -----------------------------------------------------------------------------


def test_list_pages_through_the_queue_oldest_first(store: Store) -> None:
    app = make_app(store)
    ids = queue(store, app.app_id, [f"r{i}@dest.test" for i in range(5)])
    set_row(store, ids[1], status="delivered")
    set_row(
        store,
        ids[2],
        status="deferred",
        last_reply="waiting: rate limit for dest.test (300/min)",
    )
    set_row(store, ids[3], status="held")

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page, cursor = manage.list_deliveries(store, app.app_id, cursor=cursor, limit=2)
        seen += page
        if cursor is None:
            break
    assert [d["id"] for d in seen] == [ids[0], ids[2], ids[3], ids[4]]  # not the delivered one
    waiting = seen[1]
    assert waiting["last_reply"] == "waiting: rate limit for dest.test (300/min)"
    assert waiting["next_attempt_at"] is not None
    assert seen[2]["next_attempt_at"] is None  # a held delivery has no next attempt


def test_list_filters(store: Store) -> None:
    app, other = make_app(store), make_app(store)
    a, b = queue(store, app.app_id, ["a@one.test", "b@two.test"], tag="t1")
    (c,) = queue(store, app.app_id, ["c@one.test"], tag="t2")
    queue(store, other.app_id, ["z@one.test"], tag="t1")
    set_row(store, b, status="bounced")

    def ids(**query: Any) -> list[Any]:
        page, _ = manage.list_deliveries(store, app.app_id, **query)
        return [d["id"] for d in page]

    assert ids(recipient_domain="one.test") == [a, c]
    assert ids(tag="t1") == [a]
    assert ids(status=["bounced"]) == [b]
    assert ids(status=["bounced", "queued"], tag="t1") == [a, b]
    with pytest.raises(BadFilter, match="unknown status"):
        ids(status=["lost"])


def test_summary_groups_what_waits(store: Store) -> None:
    app, other = make_app(store), make_app(store)
    ids = queue(store, app.app_id, [f"r{i}@gmail.test" for i in range(4)] + ["x@corp.test"])
    queue(store, other.app_id, ["o@gmail.test"])
    long_reply = "421 4.7.0 Too many connections from your IP " + "x" * 200
    for d in ids[:3]:
        set_row(store, d, status="deferred", last_reply=long_reply)
    set_row(store, ids[3], status="held", last_reply=None)
    set_row(store, ids[4], status="deferred", last_reply="451 4.7.1 Greylisted")
    oldest = utcnow() - timedelta(minutes=30)
    set_row(store, ids[0], first_queued_at=oldest)

    summary = manage.queue_summary(store, app.app_id, now=oldest + timedelta(minutes=30))

    assert summary["counts"] == {
        "scheduled": 0,
        "queued": 0,
        "deferred": 4,
        "sending": 0,
        "held": 1,
    }
    assert summary["oldest_queued_seconds"] == pytest.approx(1800)
    assert summary["deferred"] == {
        "count": 4,
        "by_recipient_domain": [
            {"recipient_domain": "gmail.test", "count": 3},
            {"recipient_domain": "corp.test", "count": 1},
        ],
        "by_last_reply": [
            {"last_reply": long_reply[: manage.REPLY_CHARS], "count": 3},
            {"last_reply": "451 4.7.1 Greylisted", "count": 1},
        ],
    }
    assert summary["held"]["by_last_reply"] == [{"last_reply": None, "count": 1}]


def test_summary_of_an_empty_queue(store: Store) -> None:
    app = make_app(store)
    summary = manage.queue_summary(store, app.app_id)
    assert summary["oldest_queued_seconds"] is None
    assert summary["deferred"] == {"count": 0, "by_recipient_domain": [], "by_last_reply": []}
