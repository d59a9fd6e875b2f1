"""Peaks and dips on seeded weeks of counters, on both stores: a two-hour silence of one tag
raises volume_drop, a burst volume_spike, falling deliveries delivery_rate_drop; four normal
weeks (a daily rhythm, quiet weekends, noise) raise nothing."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select

from postbode.stats import anomalies
from postbode.stats.anomalies import ALL_TAGS, HOUR, judge_rate, judge_volume
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, events, stat_counters
from postbode.testing.factories import make_app

START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
TAGS = {"password-reset": 60, "order-confirmation": 120, "newsletter": 30}


def test_judging_is_about_the_usual_level_and_last_week() -> None:
    assert judge_volume(0, [60, 55, 70, 64], None) == ("volume_drop", 62.0)
    assert judge_volume(40, [60, 55, 70, 64], None) is None
    assert judge_volume(0, [5, 6, 4], None) is None  # too small a flow for a silence to mean much
    assert judge_volume(0, [60, 60], None) is None  # too little history
    # Quiet like the same hour last week (a Sunday): no dip.
    assert judge_volume(10, [60, 60, 60, 60, 60, 60, 60], 12) is None
    assert judge_volume(400, [60, 55, 70], None) == ("volume_spike", 60.0)
    assert judge_volume(90, [20, 25, 22], None) is None  # three times, but fewer than 100
    assert judge_rate(40, 100, 950, 1000) == ("delivery_rate_drop", 0.4, 0.95)
    assert judge_rate(90, 100, 950, 1000) is None
    assert judge_rate(0, 10, 950, 1000) is None  # too few decided


def _hourly(rng: random.Random, base: int, at: datetime) -> int:
    """A flow's volume at an hour: a daily rhythm (busy afternoons), quiet weekends, noise."""
    day = 0.35 + 0.65 * math.sin(math.pi * ((at.hour - 6) % 24) / 24) ** 2
    weekend = 0.5 if at.weekday() >= 5 else 1.0
    mean = base * day * weekend
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


Shape = Callable[[str, datetime, int], int]


def seed(
    store: Store, app_id: int, hours: int, shape: Shape | None = None, seed_no: int = 7
) -> None:
    """Hourly counter rows for `hours` hours from START: received, delivered (97 %), bounced."""
    rng = random.Random(seed_no)
    rows: list[dict[str, Any]] = []
    for h in range(hours):
        at = START + timedelta(hours=h)
        for tag, base in TAGS.items():
            n = _hourly(rng, base, at)
            if shape is not None:
                n = shape(tag, at, n)
            delivered = round(n * 0.97)
            for kind, count in (
                ("message.received", n),
                ("delivery.delivered", delivered),
                ("delivery.bounced", n - delivered),
            ):
                if count:
                    rows.append(
                        {
                            "app_id": app_id,
                            "stream": "transactional",
                            "tag": tag,
                            "bucket": at,
                            "event_type": kind,
                            "count": count,
                            "bot_count": 0,
                        }
                    )
    with store.write() as conn:
        for i in range(0, len(rows), 2000):
            conn.execute(insert(stat_counters), rows[i : i + 2000])


def alerts(store: Store) -> list[tuple[str, dict[str, Any]]]:
    with store.read() as conn:
        return [
            (r.kind, dict(r.figures))
            for r in conn.execute(
                select(app_alerts.c.kind, app_alerts.c.figures).order_by(app_alerts.c.id)
            )
        ]


def test_a_two_hour_silence_of_one_tag_is_a_volume_drop(store: Store) -> None:
    app = make_app(store)
    silent = {START + timedelta(days=7, hours=14), START + timedelta(days=7, hours=15)}

    def silence(tag: str, at: datetime, n: int) -> int:
        return 0 if tag == "password-reset" and at in silent else n

    seed(store, app.app_id, 24 * 7 + 18, silence)  # a week, then Monday until 18:00
    # Each hour of that Monday is judged just after it ends, as the periodic task does.
    raised = []
    for h in range(1, 18):
        now = START + timedelta(days=7, hours=h, minutes=3)
        raised += [(f.kind, f.tag, f.hour) for f in anomalies.check(store, now=now)]
    assert raised == [
        ("volume_drop", "password-reset", START + timedelta(days=7, hours=14)),
        ("volume_drop", "password-reset", START + timedelta(days=7, hours=15)),
    ]
    kind, figures = alerts(store)[0]
    assert kind == "volume_drop" and figures["tag"] == "password-reset"
    assert figures["observed"] == 0 and figures["usual"] >= anomalies.MIN_USUAL
    with store.read() as conn:
        told = conn.execute(select(events.c.data).where(events.c.type == "app.alert")).all()
    assert [t.data["kind"] for t in told] == ["volume_drop", "volume_drop"]


def test_a_burst_is_a_volume_spike_and_bounces_a_rate_drop(store: Store) -> None:
    app = make_app(store)
    burst = START + timedelta(days=8, hours=3)  # a Tuesday night

    def shape(tag: str, at: datetime, n: int) -> int:
        return n * 12 + 200 if tag == "newsletter" and at == burst else n

    seed(store, app.app_id, 24 * 8 + 6, shape)
    found = anomalies.detect(store, now=burst + HOUR + timedelta(minutes=1))
    kinds = {(f.kind, f.tag) for f in found}
    assert ("volume_spike", "newsletter") in kinds
    assert all(f.kind == "volume_spike" for f in found)
    anomalies.check(store, now=burst + HOUR + timedelta(minutes=1))
    assert [k for k, _ in alerts(store)] == ["volume_spike"]

    # An hour where most deliveries bounce: delivery_rate_drop.
    bad = START + timedelta(days=8, hours=5)
    with store.write() as conn:
        conn.execute(
            insert(stat_counters).values(
                app_id=app.app_id,
                stream="transactional",
                tag="order-confirmation",
                bucket=bad + timedelta(minutes=30),
                event_type="delivery.bounced",
                count=400,
                bot_count=0,
            )
        )
    found = anomalies.detect(store, now=bad + HOUR + timedelta(minutes=1))
    assert {(f.kind, f.tag) for f in found} >= {("delivery_rate_drop", "order-confirmation")}
    drop = next(f for f in found if f.kind == "delivery_rate_drop" and f.tag == ALL_TAGS)
    assert drop.observed < drop.usual - anomalies.RATE_DROP


def test_four_normal_weeks_raise_nothing(store: Store) -> None:
    app = make_app(store)
    weeks = 5  # one week of history, then four weeks judged hour by hour
    seed(store, app.app_id, 24 * 7 * weeks, seed_no=11)
    hours = [START + timedelta(days=7, hours=h) for h in range(24 * 7 * (weeks - 1))]
    with store.read() as conn:
        first = anomalies.first_counted(conn, START - timedelta(days=30))
        counts = anomalies.read_counts(
            conn, [START + timedelta(hours=h) for h in range(24 * 7 * weeks)]
        )
    found = [f for hour in hours for f in anomalies.find(counts, hour, first)]
    assert found == []
