"""Compaction of old minute counters into hour rows: the same statistics from fewer rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from sqlalchemy import func, select

from postbode.events.record import Event, record
from postbode.events.types import EventType as T
from postbode.stats import queries, rollup
from postbode.store.engine import Store
from postbode.store.schema import stat_counters
from postbode.testing.factories import make_app

NOW = datetime(2026, 3, 11, 14, 37, 23, tzinfo=UTC)


def test_fold_sums_minutes_per_hour() -> None:
    def row(minute: int, kind: str, n: int, bots: int = 0) -> SimpleNamespace:
        at = datetime(2026, 3, 1, 9, minute, tzinfo=UTC)
        return SimpleNamespace(
            app_id=1, stream="s", tag="t", bucket=at, event_type=kind, count=n, bot_count=bots
        )

    hours = rollup.fold([row(1, "a", 2), row(59, "a", 3, 1), row(30, "b", 1)])
    nine = datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert hours == {(1, "s", "t", nine, "a"): [5, 1], (1, "s", "t", nine, "b"): [1, 0]}


def _rows(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(stat_counters)).scalar_one())


def test_compaction_keeps_every_statistic(store: Store) -> None:
    app = make_app(store).app_id
    batch = []
    for days, minutes in ((5, range(0, 50, 7)), (3, range(3, 60, 11)), (0, range(0, 30, 5))):
        for m in minutes:
            at = NOW - timedelta(days=days, minutes=m)
            batch += [
                Event(app_id=app, type=T.DELIVERY_DELIVERED, tag="welcome", at=at),
                Event(app_id=app, type=T.MESSAGE_OPENED, tag="welcome", at=at, bot=m % 2 == 0),
                Event(app_id=app, type=T.DELIVERY_QUEUED, tag=None, stream="broadcast", at=at),
            ]
    with store.write() as conn:
        record(conn, batch)
    before = {r: queries.dashboard(store, [app], r, now=NOW) for r in ("24h", "7d", "30d")}
    rows = _rows(store)

    removed = rollup.compact(store, now=NOW)
    assert removed > 0 and _rows(store) == rows - removed
    for name, board in before.items():  # hour rows fall in the same 15 min, hour, day buckets
        after = queries.dashboard(store, [app], name, now=NOW)
        assert after.summary == board.summary and after.tags == board.tags, name
        assert after.series.counts == board.series.counts, name
    with store.read() as conn:
        old = conn.execute(
            select(stat_counters.c.bucket).where(stat_counters.c.bucket < NOW - rollup.KEEP_MINUTES)
        ).scalars()
        assert {b.minute for b in old} == {0}
        recent = conn.execute(
            select(func.count()).where(stat_counters.c.bucket >= NOW - timedelta(hours=1))
        ).scalar_one()
    assert recent > 3  # the last two days keep their minutes

    assert rollup.compact(store, now=NOW) == 0  # nothing new below the watermark
    late = NOW - timedelta(days=5, minutes=33)  # an old event recorded late (a backfill)
    with store.write() as conn:
        record(conn, Event(app_id=app, type=T.DELIVERY_DELIVERED, tag="welcome", at=late))
    assert rollup.compact(store, now=NOW) == 0  # below the watermark: left as it is
    assert queries.summary(store, [app], "30d", now=NOW).totals["delivery.delivered"] == (
        before["30d"].summary.totals["delivery.delivered"] + 1
    )
    assert rollup.compact(store, now=NOW, everything=True) == 1
