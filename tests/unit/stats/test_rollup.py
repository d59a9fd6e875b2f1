"""Compaction of aged counters into coarser rows: the same statistics from fewer rows."""

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


def test_levels_keep_rows_as_fine_as_any_chart_ending_now_shows_them() -> None:
    sizes = queries.BUCKET_SIZES
    assert [size for _, size in rollup.LEVELS] == list(sizes[1:])
    for (age, _), shown in zip(rollup.LEVELS, sizes, strict=False):
        assert shown * queries.MAX_POINTS + shown <= age  # the widest window, and alignment


def test_fold_sums_rows_per_bucket() -> None:
    def row(minute: int, kind: str, n: int, bots: int = 0, template: str = "") -> SimpleNamespace:
        at = datetime(2026, 3, 1, 9, minute, tzinfo=UTC)
        return SimpleNamespace(
            app_id=1,
            stream="s",
            tag="t",
            template=template,
            bucket=at,
            event_type=kind,
            count=n,
            bot_count=bots,
        )

    rows = [row(1, "a", 2), row(59, "a", 3, 1), row(30, "b", 1), row(31, "a", 4, 2, "welcome")]
    nine = datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert rollup.fold(rows, timedelta(hours=1)) == {
        (1, "s", "t", "", nine, "a"): [5, 1],
        (1, "s", "t", "", nine, "b"): [1, 0],
        (1, "s", "t", "welcome", nine, "a"): [4, 2],  # each template's rows apart
    }
    quarters = rollup.fold(rows, timedelta(minutes=15))
    assert quarters[(1, "s", "t", "", nine.replace(minute=45), "a")] == [3, 1]
    assert quarters[(1, "s", "t", "welcome", nine.replace(minute=30), "a")] == [4, 2]
    day = rollup.fold(rows, timedelta(days=1))
    assert day[(1, "s", "t", "", nine.replace(hour=0), "a")] == [5, 1]


def _buckets(store: Store, since: datetime, until: datetime) -> list[datetime]:
    with store.read() as conn:
        return list(
            conn.execute(
                select(stat_counters.c.bucket).where(
                    stat_counters.c.bucket >= since, stat_counters.c.bucket < until
                )
            ).scalars()
        )


def _rows(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(stat_counters)).scalar_one())


def test_compaction_keeps_every_statistic(store: Store) -> None:
    app = make_app(store).app_id
    batch = []
    for age in (timedelta(days=20), timedelta(days=5), timedelta(hours=30), timedelta(0)):
        for m in range(0, 130, 7):
            at = NOW - age - timedelta(minutes=m)
            batch += [
                Event(app_id=app, type=T.DELIVERY_DELIVERED, tag="welcome", at=at),
                Event(app_id=app, type=T.MESSAGE_OPENED, tag="welcome", at=at, bot=m % 2 == 0),
                *(  # mail from two templates under the same tag
                    Event(app_id=app, type=kind, tag="welcome", template=alias, at=at, bot=bot)
                    for alias in ("hello", "receipt")
                    for kind, bot in (
                        (T.DELIVERY_QUEUED, False),
                        (T.DELIVERY_DELIVERED, False),
                        (T.MESSAGE_OPENED, m % 3 == 0),
                    )
                ),
                Event(app_id=app, type=T.DELIVERY_QUEUED, tag=None, stream="broadcast", at=at),
            ]
    with store.write() as conn:
        record(conn, batch)
    ranges = ("1h", "24h", "7d", "30d")
    before = {r: queries.dashboard(store, [app], r, now=NOW) for r in ranges}
    templates = {r: queries.template_stats(store, [app], r, now=NOW) for r in ranges}
    one = {
        r: queries.series_and_summary(store, [app], r, template="hello", now=NOW) for r in ranges
    }
    assert [t.tag for t in templates["30d"]] == ["hello", "receipt"]
    rows = _rows(store)

    removed = rollup.compact(store, now=NOW)
    assert removed > 0 and _rows(store) == rows - removed
    for name, board in before.items():  # each chart's buckets are still exact
        after = queries.dashboard(store, [app], name, now=NOW)
        assert after.summary == board.summary and after.tags == board.tags, name
        assert after.series.counts == board.series.counts, name
        assert after.series.bots == board.series.bots, name
        # and each template's, kept apart
        assert queries.template_stats(store, [app], name, now=NOW) == templates[name], name
        series, summary = queries.series_and_summary(store, [app], name, template="hello", now=NOW)
        assert (series.counts, series.bots, summary) == (
            one[name][0].counts,
            one[name][0].bots,
            one[name][1],
        ), name
    # Days beyond 9 days, hours beyond 52 h, quarter hours beyond 4 h, minutes after.
    assert {b.hour for b in _buckets(store, NOW - timedelta(days=30), NOW - timedelta(days=9))} == {
        0
    }
    week = _buckets(store, NOW - timedelta(days=9), NOW - timedelta(hours=52))
    assert week and {b.minute for b in week} == {0}
    hours = _buckets(store, NOW - timedelta(hours=52), NOW - timedelta(hours=4))
    assert hours and {b.minute for b in hours} <= {0, 15, 30, 45}
    recent = _buckets(store, NOW - timedelta(hours=2), NOW + timedelta(hours=1))
    assert len(recent) > 8 and {b.minute for b in recent} - {0, 15, 30, 45}

    assert rollup.compact(store, now=NOW) == 0  # nothing new below the watermarks
    later = rollup.compact(store, now=NOW + timedelta(hours=5))  # the day goes on
    assert later > 0
    late = NOW - timedelta(days=5, minutes=33)  # an old event recorded late (a backfill)
    with store.write() as conn:
        record(conn, Event(app_id=app, type=T.DELIVERY_DELIVERED, tag="welcome", at=late))
    assert rollup.compact(store, now=NOW + timedelta(hours=5)) == 0  # below the watermarks
    month = queries.summary(store, [app], "30d", now=NOW)
    assert month.totals["delivery.delivered"] == (
        before["30d"].summary.totals["delivery.delivered"] + 1
    )
    assert rollup.compact(store, now=NOW + timedelta(hours=5), everything=True) == 1
    assert queries.summary(store, [app], "30d", now=NOW) == month


def test_compaction_keeps_the_bounce_reasons(store: Store) -> None:
    from postbode.store.schema import bounce_counters

    app = make_app(store).app_id
    batch = [
        Event(
            app_id=app,
            type=T.DELIVERY_BOUNCED,
            tag="welcome" if m % 2 else None,
            at=NOW - age - timedelta(minutes=m),
            data={
                "category": ("blocked", "user_unknown", "mailbox_full")[m % 3],
                "hard": m % 5 == 0,
            },
        )
        for age in (timedelta(days=20), timedelta(days=5), timedelta(hours=30), timedelta(0))
        for m in range(0, 130, 7)
    ]
    with store.write() as conn:
        record(conn, batch)

    def reasons() -> dict[tuple[str, str | None], list[queries.BounceReason]]:
        return {
            (r, tag): queries.top_bounce_reasons(store, [app], r, tag=tag, now=NOW)
            for r in ("1h", "24h", "7d", "30d")
            for tag in (None, "welcome", "")
        }

    def count() -> int:
        with store.read() as conn:
            return int(conn.execute(select(func.count()).select_from(bounce_counters)).scalar_one())

    before, rows = reasons(), count()
    assert sum(r.count for r in before[("30d", None)]) == len(batch)
    assert rollup.compact(store, now=NOW) > 0
    assert count() < rows
    assert reasons() == before
