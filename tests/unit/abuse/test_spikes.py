"""Spike detection: the judgement, the baseline from the statistics, holding and alerting, and
what a release leaves out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select

from postbode import tenancy
from postbode.abuse import hold, spikes
from postbode.abuse.release import release
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, apps, stat_counters

S = spikes.SpikeSettings()
NOW = datetime(2026, 12, 7, 15, 20, 30, tzinfo=UTC)


def test_judge_wants_far_above_the_baseline_and_above_the_floor() -> None:
    assert spikes.judge(150, 2.0, S) == 100.0  # floor
    assert spikes.judge(99, 2.0, S) is None
    assert spikes.judge(400, 50.0, S) is None  # 10 x 50 = 500
    assert spikes.judge(501, 50.0, S) == 500.0
    assert spikes.judge(10_000, None, S) is None  # a new app is not judged by default
    assert spikes.judge(301, None, spikes.SpikeSettings(new_app=300)) == 300


def test_ewma_weighs_the_newest_week_most() -> None:
    assert spikes.ewma([]) == 0.0
    assert spikes.ewma([4.0]) == 4.0
    assert spikes.ewma([0.0, 4.0]) == 2.0
    assert spikes.ewma([4.0, 0.0]) == 2.0
    assert spikes.ewma([8.0, 0.0, 0.0]) == 2.0


def counters(store: Store, app_id: int, rows: list[tuple[datetime, int, str]]) -> None:
    with store.write() as conn:
        conn.execute(
            insert(stat_counters),
            [
                {
                    "app_id": app_id,
                    "stream": "transactional",
                    "tag": tag,
                    "bucket": at,
                    "event_type": "message.received",
                    "count": n,
                    "bot_count": 0,
                }
                for at, n, tag in rows
            ],
        )


def test_baseline_is_the_same_hour_of_earlier_weeks(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    hour = NOW.replace(minute=0, second=0)
    counters(
        store,
        shop.app_id,
        [
            (hour - timedelta(weeks=1), 120, "order"),  # 2/min, hourly row
            (hour - timedelta(weeks=1, hours=1), 6000, "order"),  # another hour: not counted
            (hour.replace(hour=0) - timedelta(weeks=2), 1440 * 4, ""),  # a daily row: 4/min
        ],
    )
    with store.read() as conn:
        assert spikes.baseline(conn, shop.app_id, None, NOW) == 3.0  # ewma of 4 then 2
        assert spikes.baseline(conn, shop.app_id, "order", NOW) == 2.0
        assert spikes.baseline(conn, shop.app_id, "new-tag", NOW) is None


def test_a_burst_holds_the_app_once_and_a_release_forgets_it(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    hour = NOW.replace(minute=0, second=0)
    minute = NOW.replace(second=0)
    counters(
        store,
        shop.app_id,
        [(hour - timedelta(weeks=1), 120, "order"), (minute, 400, "order")],
    )
    [spike] = spikes._check(store, S, NOW, None)
    assert (spike.app_id, spike.tag, spike.baseline, spike.per_minute) == (
        shop.app_id,
        None,
        2.0,
        400.0,
    )
    with store.read() as conn:
        reason = conn.execute(select(apps.c.hold_reason)).scalar_one()
        kinds = conn.execute(select(app_alerts.c.kind, app_alerts.c.held)).all()
    assert reason is not None and "400/min" in reason
    assert [tuple(k) for k in kinds] == [("spike", True)]
    assert spikes._check(store, S, NOW, None) == []  # held: not judged again
    release(store, shop.app_id, hold.Actor("owner@shop.test"))
    # What the minute held at the release no longer counts; new mail after it does (judged
    # here as a new app's: the history above is of another hour of the week).
    judged = spikes.SpikeSettings(new_app=100)
    assert spikes._check(store, judged, datetime.now(UTC), None) == []
    counters(store, shop.app_id, [(datetime.now(UTC).replace(second=0, microsecond=0), 500, "x")])
    [again] = spikes._check(store, judged, datetime.now(UTC), None)
    assert again.per_minute >= 500


def test_a_tag_can_spike_while_the_app_as_a_whole_does_not(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    hour = NOW.replace(minute=0, second=0)
    minute = NOW.replace(second=0)
    counters(
        store,
        shop.app_id,
        [
            (hour - timedelta(weeks=1), 60 * 1000, "newsletter"),  # 1,000/min
            (hour - timedelta(weeks=1), 60, "password-reset"),  # 1/min
            (minute, 900, "newsletter"),
            (minute, 300, "password-reset"),
        ],
    )
    [spike] = spikes._check(store, S, NOW, None)
    assert spike.tag == "password-reset" and spike.figures["tag"] == "password-reset"
