"""Pure statistics logic: bucket sizes and floors, windows, rates, the z-test and its note."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from postbode.stats.queries import (
    MAX_POINTS,
    StatsError,
    bounce_reasons_of,
    bucket_floor,
    bucket_size,
    rates,
    significance_note,
    two_proportion_z,
    window,
)

NOW = datetime(2026, 3, 11, 14, 37, 23, 500_000, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(
    ("span", "size"),
    [
        (timedelta(minutes=10), timedelta(minutes=1)),
        (timedelta(hours=1), timedelta(minutes=1)),
        (timedelta(hours=3), timedelta(minutes=1)),
        (timedelta(hours=4), timedelta(minutes=15)),
        (timedelta(hours=24), timedelta(minutes=15)),
        (timedelta(hours=48), timedelta(minutes=15)),
        (timedelta(days=7), timedelta(hours=1)),
        (timedelta(days=30), timedelta(days=1)),
        (timedelta(days=400), timedelta(days=1)),
    ],
)
def test_bucket_size_keeps_charts_readable(span: timedelta, size: timedelta) -> None:
    assert bucket_size(span) == size


def test_bucket_size_never_exceeds_max_points_below_200_days() -> None:
    for hours in range(1, 24 * 200, 7):
        span = timedelta(hours=hours)
        assert span / bucket_size(span) <= MAX_POINTS


@pytest.mark.parametrize(
    ("size", "floor"),
    [
        (timedelta(minutes=1), datetime(2026, 3, 11, 14, 37, tzinfo=UTC)),
        (timedelta(minutes=15), datetime(2026, 3, 11, 14, 30, tzinfo=UTC)),
        (timedelta(hours=1), datetime(2026, 3, 11, 14, 0, tzinfo=UTC)),
        (timedelta(days=1), datetime(2026, 3, 11, tzinfo=UTC)),
    ],
)
def test_bucket_floor_aligns_on_utc(size: timedelta, floor: datetime) -> None:
    assert bucket_floor(NOW, size) == floor
    assert bucket_floor(floor, size) == floor  # a bucket start is its own floor
    # another zone, the same instant, the same bucket
    assert bucket_floor(NOW.astimezone(datetime.now().astimezone().tzinfo), size) == floor


def test_bucket_floor_refuses_naive_time() -> None:
    with pytest.raises(ValueError, match="naive"):
        bucket_floor(NOW.replace(tzinfo=None), timedelta(minutes=1))


@pytest.mark.parametrize(
    ("name", "count", "size"),
    [("1h", 60, 60), ("24h", 96, 900), ("7d", 168, 3600), ("30d", 30, 86400)],
)
def test_named_ranges_end_with_the_running_bucket(name: str, count: int, size: int) -> None:
    win = window(name, now=NOW)
    assert win.size == timedelta(seconds=size)
    assert len(win.buckets) == count
    assert win.buckets[-1] <= NOW < win.until == win.buckets[-1] + win.size
    assert win.buckets[0] == win.since
    assert win.index(NOW) == count - 1 and win.index(win.since) == 0


def test_custom_window_is_minute_precise_and_checked() -> None:
    win = window(since=datetime(2026, 3, 1, 10, 0, 30), until=datetime(2026, 3, 1, 12, 0, 59))
    assert win.since == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)  # naive is UTC
    assert win.until == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert win.size == timedelta(minutes=1) and len(win.buckets) == 120
    open_ended = window(since=NOW - timedelta(days=2), now=NOW)
    assert open_ended.until == NOW and open_ended.size == timedelta(minutes=15)
    assert window(now=NOW) == window("24h", now=NOW)  # the default
    with pytest.raises(StatsError) as bad:
        window("2w", now=NOW)
    assert bad.value.field == "range"
    with pytest.raises(StatsError) as both:
        window("24h", since=NOW, now=NOW)
    assert both.value.field == "range"
    with pytest.raises(StatsError) as backwards:
        window(since=NOW, until=NOW - timedelta(hours=1))
    assert backwards.value.field == "until"
    with pytest.raises(StatsError):
        window(since=NOW - timedelta(days=500), until=NOW)


def test_rates_count_people_and_cap_at_one() -> None:
    totals = {
        "delivery.delivered": 90,
        "delivery.bounced": 6,
        "delivery.failed": 4,
        "message.opened": 150,
        "message.clicked": 30,
        "message.complained": 1,
    }
    bots = {"message.opened": 40, "message.clicked": 12}
    r = rates(totals, bots)
    assert r.delivery_rate == pytest.approx(0.9)
    assert r.bounce_rate == pytest.approx(0.06)
    assert r.open_rate == 1.0  # 110 human opens of 90 delivered: repeat opens, capped
    assert r.click_rate == pytest.approx(18 / 90)
    assert r.complaint_rate == pytest.approx(1 / 90)
    nothing = rates({}, {})
    assert nothing.delivery_rate is None and nothing.open_rate is None


def test_z_test_matches_a_worked_example() -> None:
    # 200/1000 vs 150/1000: pooled p = 0.175, se = sqrt(.175*.825*.002) = 0.016993
    test = two_proportion_z(200, 1000, 150, 1000)
    assert test is not None
    assert test.z == pytest.approx(0.05 / math.sqrt(0.175 * 0.825 * 0.002), rel=1e-9)
    assert test.z == pytest.approx(2.9424, abs=1e-4)
    assert test.p_value == pytest.approx(0.003257, abs=1e-5)
    assert test.significant and not test.approximate
    same = two_proportion_z(50, 100, 500, 1000)
    assert same is not None and same.z == 0 and same.p_value == 1 and not same.significant
    assert two_proportion_z(0, 0, 5, 10) is None  # no trials on one side
    assert two_proportion_z(0, 10, 0, 10) is None  # no variance
    tiny = two_proportion_z(2, 10, 7, 10)
    assert tiny is not None and tiny.approximate


def test_significance_note_says_which_is_higher_or_that_it_may_be_chance() -> None:
    note = significance_note("open_rate", (200, 1000), (150, 1000))
    assert note.startswith("open rate: A 20.0 % vs B 15.0 %")
    assert "A is higher by 5.0 points" in note and "95 %" in note
    chance = significance_note("click_rate", (21, 200), (20, 200))
    assert "may be chance" in chance
    assert significance_note("open_rate", (0, 0), (1, 10)) == "open rate: not enough data yet"
    assert "rough guide" in significance_note("bounce_rate", (1, 10), (9, 10))


def test_bounce_reasons_fold_hard_and_soft_per_category() -> None:
    rows = [
        ("user_unknown", True, 30),
        ("mailbox_full", False, 12),
        ("blocked", False, 6),
        ("blocked", True, 4),
    ]
    found = bounce_reasons_of(rows, limit=2)
    assert [(r.category, r.count, r.hard) for r in found] == [
        ("user_unknown", 30, 30),
        ("mailbox_full", 12, 0),
    ]
    assert found[0].share == pytest.approx(30 / 52)
