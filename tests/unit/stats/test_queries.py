"""Statistics read from the counters that events.record keeps, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from postbode.events.record import Event, record
from postbode.events.types import EventType as T
from postbode.stats import queries
from postbode.stats.queries import StatsError
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages
from postbode.testing.factories import make_app, make_queued_message

NOW = datetime(2026, 3, 11, 14, 37, 23, tzinfo=UTC)


def ev(app_id: int, type: T, ago: timedelta, tag: str | None = "welcome", **kw: Any) -> Event:
    return Event(app_id=app_id, type=type, tag=tag, at=NOW - ago, **kw)


@pytest.fixture
def traffic(store: Store) -> tuple[int, int]:
    """Two apps' events around NOW; returns (app, other app)."""
    app, other = make_app(store).app_id, make_app(store).app_id
    m = timedelta(minutes=1)
    h = timedelta(hours=1)
    batch = [
        # welcome: 4 queued, 3 delivered, 1 bounced, opens and clicks (some by bots)
        *(ev(app, T.DELIVERY_QUEUED, 10 * m) for _ in range(4)),
        ev(app, T.DELIVERY_DELIVERED, 9 * m),
        ev(app, T.DELIVERY_DELIVERED, 9 * m),
        ev(app, T.DELIVERY_DELIVERED, 3 * h),
        ev(app, T.DELIVERY_BOUNCED, 5 * h, data={"category": "user_unknown", "hard": True}),
        ev(app, T.MESSAGE_OPENED, 2 * h),
        ev(app, T.MESSAGE_OPENED, 2 * h, bot=True),
        ev(app, T.MESSAGE_CLICKED, 2 * h),
        # password-reset: 2 queued, 1 delivered, 1 soft bounce
        ev(app, T.DELIVERY_QUEUED, 6 * h, tag="password-reset"),
        ev(app, T.DELIVERY_QUEUED, 6 * h, tag="password-reset"),
        ev(app, T.DELIVERY_DELIVERED, 6 * h, tag="password-reset"),
        ev(
            app,
            T.DELIVERY_BOUNCED,
            6 * h,
            tag="password-reset",
            data={"category": "mailbox_full", "hard": False},
        ),
        # a broadcast, untagged
        ev(app, T.DELIVERY_QUEUED, 40 * m, tag=None, stream="broadcast"),
        ev(app, T.DELIVERY_DELIVERED, 40 * m, tag=None, stream="broadcast"),
        # outside 24 h, inside 7 d
        ev(app, T.DELIVERY_DELIVERED, 30 * h),
        ev(app, T.DELIVERY_BOUNCED, 30 * h, data={"category": "blocked", "hard": False}),
        # another app
        ev(other, T.DELIVERY_DELIVERED, 1 * h),
        ev(other, T.DELIVERY_BOUNCED, 1 * h, data={"category": "blocked", "hard": True}),
    ]
    with store.write() as conn:
        record(conn, batch)
    return app, other


def test_series_is_zero_filled_per_bucket(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic
    s = queries.series(store, [app], "24h", now=NOW)
    assert len(s.buckets) == 96 and s.window.size == timedelta(minutes=15)
    assert set(s.counts) == set(queries.SERIES_TYPES)
    delivered = s.counts["delivery.delivered"]
    assert len(delivered) == 96 and sum(delivered) == 5  # the 30 h old one is outside
    assert delivered[s.window.index(NOW - timedelta(minutes=9))] == 2
    assert delivered[s.window.index(NOW - timedelta(hours=3))] == 1
    assert s.counts["delivery.deferred"] == [0] * 96
    opens = s.window.index(NOW - timedelta(hours=2))
    assert s.counts["message.opened"][opens] == 2 and s.bots["message.opened"][opens] == 1
    assert sum(s.bots["delivery.delivered"]) == 0

    assert sum(queries.series(store, None, "24h", now=NOW).counts["delivery.delivered"]) == 6
    assert sum(queries.series(store, [], "24h", now=NOW).counts["delivery.delivered"]) == 0
    week = queries.series(store, [app], "7d", now=NOW)
    assert len(week.buckets) == 168 and sum(week.counts["delivery.delivered"]) == 6
    # Every bucket size puts each count in its own bucket, on both dialects.
    for name in ("1h", "24h", "7d", "30d"):
        s = queries.series(store, [app], name, now=NOW)
        for ago, n in ((timedelta(minutes=9), 2), (timedelta(hours=30), 1)):
            if NOW - ago >= s.window.since:
                at = s.window.index(NOW - ago)
                assert s.counts["delivery.delivered"][at] >= n, (name, ago)
        assert sum(s.counts["delivery.delivered"]) == {"1h": 3, "24h": 5}.get(name, 6)
    three = queries.series(store, [app], since=NOW - timedelta(hours=3), until=NOW, now=NOW)
    assert three.window.size == timedelta(minutes=1)
    assert three.counts["delivery.delivered"][three.window.index(NOW - timedelta(minutes=9))] == 2


def test_series_filters(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic

    def delivered(**kw: Any) -> int:
        s = queries.series(store, [app], "24h", now=NOW, **kw)
        return sum(s.counts["delivery.delivered"])

    assert delivered(tag="welcome") == 2 + 1
    assert delivered(tag="password-reset") == 1
    assert delivered(tag="") == 1  # untagged
    assert delivered(stream="broadcast") == 1
    assert delivered(stream="transactional") == 4
    only = queries.series(store, [app], "1h", types=["delivery.queued"], now=NOW)
    assert list(only.counts) == ["delivery.queued"] and len(only.buckets) == 60
    assert sum(only.counts["delivery.queued"]) == 5
    with pytest.raises(StatsError) as bad:
        queries.series(store, [app], "24h", types=["delivery.nope"], now=NOW)
    assert bad.value.field == "types"


def test_custom_window_includes_since_and_excludes_until(
    store: Store, traffic: tuple[int, int]
) -> None:
    app, _ = traffic
    at = NOW - timedelta(minutes=9)  # two deliveries in this minute
    inside = queries.summary(store, [app], since=at, until=at + timedelta(minutes=1))
    assert inside.totals == {"delivery.delivered": 2}
    before = queries.summary(store, [app], since=at - timedelta(minutes=5), until=at)
    assert "delivery.delivered" not in before.totals


def test_summary_totals_and_rates(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic
    s = queries.summary(store, [app], "24h", now=NOW)
    assert s.totals["delivery.delivered"] == 5
    assert s.totals["delivery.bounced"] == 2
    assert s.sent == 7
    assert s.bots == {"message.opened": 1}
    assert s.human["message.opened"] == 1
    assert s.rates.delivery_rate == pytest.approx(5 / 7)
    assert s.rates.bounce_rate == pytest.approx(2 / 7)
    assert s.rates.open_rate == pytest.approx(1 / 5)  # the bot's open does not count
    assert s.rates.click_rate == pytest.approx(1 / 5)
    series, same = queries.series_and_summary(store, [app], "24h", now=NOW)
    assert same == s and sum(series.counts["delivery.bounced"]) == 2


def test_top_tags_by_volume_with_rates(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic
    tags = queries.top_tags(store, [app], "24h", now=NOW)
    assert [(t.tag, t.sent) for t in tags] == [("welcome", 4), ("password-reset", 2), ("", 1)]
    welcome = tags[0]
    assert welcome.rates.delivery_rate == pytest.approx(3 / 4)
    assert welcome.rates.open_rate == pytest.approx(1 / 3)
    assert [t.tag for t in queries.top_tags(store, [app], "24h", limit=1, now=NOW)] == ["welcome"]
    broadcast = queries.top_tags(store, [app], "24h", stream="broadcast", now=NOW)
    assert [t.tag for t in broadcast] == [""]


def test_top_bounce_reasons_from_events(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic
    day = queries.top_bounce_reasons(store, [app], "24h", now=NOW)
    assert [(r.category, r.count, r.hard) for r in day] == [
        ("mailbox_full", 1, 0),
        ("user_unknown", 1, 1),
    ]
    week = queries.top_bounce_reasons(store, [app], "7d", now=NOW)
    assert {r.category for r in week} == {"blocked", "mailbox_full", "user_unknown"}
    everyone = queries.top_bounce_reasons(store, None, "24h", now=NOW)
    assert [r.category for r in everyone] == ["blocked", "mailbox_full", "user_unknown"]


def test_top_bounce_reasons_narrowed_by_tag(store: Store) -> None:
    app = make_app(store).app_id
    welcome, _ = make_queued_message(store, app, ["a@dest.test"])
    other, _ = make_queued_message(store, app, ["b@dest.test"])
    with store.write() as conn:
        conn.execute(update(messages).where(messages.c.id == welcome).values(tag="welcome"))
        record(
            conn,
            [
                ev(
                    app,
                    T.DELIVERY_BOUNCED,
                    timedelta(hours=1),
                    message_id=welcome,
                    data={"category": "user_unknown", "hard": True},
                ),
                ev(
                    app,
                    T.DELIVERY_BOUNCED,
                    timedelta(hours=1),
                    tag=None,
                    message_id=other,
                    data={"category": "blocked", "hard": False},
                ),
                ev(
                    app, T.DELIVERY_BOUNCED, timedelta(hours=1), tag=None, message_id=other, data={}
                ),
            ],
        )
    tagged = queries.top_bounce_reasons(store, [app], "24h", tag="welcome", now=NOW)
    assert [r.category for r in tagged] == ["user_unknown"]
    untagged = queries.top_bounce_reasons(store, [app], "24h", tag="", now=NOW)
    assert sorted(r.category for r in untagged) == ["blocked", "unknown"]


def test_queue_now_counts_waiting_deliveries(store: Store) -> None:
    app, other = make_app(store).app_id, make_app(store).app_id
    _, ids = make_queued_message(store, app, [f"r{i}@dest.test" for i in range(6)])
    make_queued_message(store, other, ["x@dest.test"])
    statuses = ["queued", "deferred", "deferred", "held", "delivered", "sending"]
    with store.write() as conn:
        for i, (delivery_id, status) in enumerate(zip(ids, statuses, strict=True)):
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(status=status, first_queued_at=NOW - timedelta(minutes=10 * (i + 1)))
            )
    q = queries.queue_now(store, [app], now=NOW)
    assert q.depth == {"queued": 1, "sending": 1, "deferred": 2, "held": 1}
    assert q.oldest_queued_age == timedelta(minutes=10)
    assert q.oldest_deferred_age == timedelta(minutes=30)
    assert queries.queue_now(store, None, now=NOW).depth["queued"] == 2
    empty = queries.queue_now(store, [other + 1000], now=NOW)
    assert empty.depth == dict.fromkeys(queries.PENDING_STATUSES, 0)
    assert empty.oldest_deferred_age is None
    assert empty.as_json()["oldest_deferred_seconds"] is None


def test_compare_two_tags(store: Store) -> None:
    app = make_app(store).app_id
    h = timedelta(hours=1)
    batch = []
    for tag, delivered, opens in (("subject-a", 1000, 300), ("subject-b", 1000, 220)):
        batch += [ev(app, T.DELIVERY_DELIVERED, h, tag=tag) for _ in range(delivered)]
        batch += [ev(app, T.MESSAGE_OPENED, h, tag=tag) for _ in range(opens)]
        batch += [ev(app, T.MESSAGE_OPENED, h, tag=tag, bot=True) for _ in range(100)]
    with store.write() as conn:
        record(conn, batch)
    result = queries.compare(store, [app], "subject-a", "subject-b", "24h", now=NOW)
    assert result.a.tag == "subject-a" and result.a.totals["delivery.delivered"] == 1000
    tests = {t.metric: t for t in result.tests}
    opens = tests["open_rate"]
    assert opens.a == (300, 1000) and opens.b == (220, 1000)  # bots left out
    assert opens.test is not None and opens.test.significant
    assert "A is higher by 8.0 points" in opens.note
    assert tests["click_rate"].test is None  # no clicks on either side
    missing = queries.compare(store, [app], "subject-a", "nope", "24h", now=NOW)
    assert missing.b.totals == {} and "not enough data" in missing.as_json()["tests"][1]["note"]


def test_dashboard_in_one_call(store: Store, traffic: tuple[int, int]) -> None:
    app, _ = traffic
    board = queries.dashboard(store, [app], "24h", now=NOW)
    assert board.summary == queries.summary(store, [app], "24h", now=NOW)
    assert board.series.counts == queries.series(store, [app], "24h", now=NOW).counts
    assert [t.tag for t in board.tags] == ["welcome", "password-reset", ""]
    assert {r.category for r in board.bounce_reasons} == {"user_unknown", "mailbox_full"}
    assert board.queue.depth["queued"] == 0


def test_template_stats_count_as_one_template_does(store: Store) -> None:
    """Every template in one scan of the counters, each counted exactly as
    series_and_summary(template=) counts it: raw repeats left out, bots apart, mail not from a
    template not counted, whatever its tag."""
    app, other = make_app(store).app_id, make_app(store).app_id
    made = {}
    of = {"w1": "welcome", "w2": "welcome", "r": "receipt", "p": None}
    for name, template in of.items():
        made[name], _ = make_queued_message(store, app, [f"{name}@dest.test"])
        with store.write() as conn:
            conn.execute(
                update(messages).where(messages.c.id == made[name]).values(template=template)
            )
    theirs, _ = make_queued_message(store, other, ["x@dest.test"])
    with store.write() as conn:
        conn.execute(update(messages).where(messages.c.id == theirs).values(template="welcome"))
    hour = timedelta(hours=1)

    def on(app_id: int, kind: T, ago: timedelta, name: str, **kw: Any) -> Event:
        # as the recorders write them: the message's tag and template alias
        message_id = theirs if app_id == other else made[name]
        alias = "welcome" if app_id == other else of[name]
        tag = "signup" if name == "w2" else "welcome"  # a template's mail under two tags
        return ev(app_id, kind, ago, tag=tag, template=alias, message_id=message_id, **kw)

    events = []
    for name in ("w1", "w2", "r", "p"):
        events += [
            on(app, T.DELIVERY_QUEUED, hour, name),
            on(app, T.DELIVERY_DELIVERED, hour, name),
        ]
    events += [
        on(app, T.MESSAGE_OPENED, hour, "w1"),
        on(app, T.MESSAGE_OPENED, hour, "w2", data={"bot": True}, bot=True),
        on(app, T.MESSAGE_CLICKED, hour, "w1"),
        # a repeated click: kept as a record, not counted (as the tracker records one)
        on(app, T.MESSAGE_CLICKED, hour, "w1", data={"repeat": True}, counted=False),
        on(app, T.DELIVERY_BOUNCED, hour, "r"),
        on(app, T.MESSAGE_OPENED, timedelta(days=3), "r"),  # before the range
        on(other, T.DELIVERY_QUEUED, hour, "x"),
    ]
    with store.write() as conn:
        record(conn, events)

    found = {t.tag: t for t in queries.template_stats(store, [app], "24h", now=NOW)}
    assert list(found) == ["welcome", "receipt"]  # most sent first; mail not from one left out
    for alias, stats in found.items():
        _, one = queries.series_and_summary(store, [app], "24h", template=alias, now=NOW)
        assert (stats.totals, stats.bots, stats.rates) == (one.totals, one.bots, one.rates)
    welcome = found["welcome"]
    assert welcome.sent == 2 and welcome.totals[queries.CLICKED] == 1
    assert welcome.rates.open_rate == 0.5  # the bot's open is not a person's
    assert found["receipt"].totals.get(queries.OPENED, 0) == 0
    assert queries.template_stats(store, [other], "24h", now=NOW)[0].sent == 1
    empty = make_app(store).app_id
    assert queries.template_stats(store, [empty], "30d", now=NOW) == []
    # Sums over tags (or everything) add up every template's rows and the untemplated ones.
    everything = queries.summary(store, [app], "24h", now=NOW)
    assert everything.totals[queries.QUEUED] == 4 and everything.totals[queries.CLICKED] == 1
    by_tag = queries.summary(store, [app], "24h", tag="welcome", now=NOW)
    assert by_tag.totals[queries.QUEUED] == 3  # w1, r and p; w2 is under "signup"
