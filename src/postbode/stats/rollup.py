"""Keeps stat_counters small: minute rows are merged into quarter-hour, hour and day rows as
they age, at the resolution the charts over them use."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from postbode.stats.queries import bucket_floor
from postbode.store.engine import Store
from postbode.store.schema import stat_counters, system_values, utcnow

# (older than, merged into rows of): every chart of a window ending now still gets exact
# buckets, since a bucket size serves windows up to MAX_POINTS of it (1 min: 3 h 20 min,
# 15 min: 50 h, 1 h: 8 days 8 h) and rows stay that fine for longer. A 30-day dashboard then
# reads some 30,000 rows at a million messages a month instead of a million. A custom window
# that ended in the past, at a finer resolution than its rows, sees them at the start of
# their bucket.
LEVELS: tuple[tuple[timedelta, timedelta], ...] = (
    (timedelta(hours=4), timedelta(minutes=15)),
    (timedelta(hours=52), timedelta(hours=1)),
    (timedelta(days=9), timedelta(days=1)),
)
_LOCK_KEY = 0x706273746174  # PostgreSQL advisory lock: one compaction at a time

Key = tuple[int, str, str, str, datetime, str]  # app, stream, tag, template, bucket, type


def fold(rows: Iterable[Any], size: timedelta) -> dict[Key, list[int]]:
    """Counter rows summed per bucket of `size` (pure): {(app, stream, tag, template, bucket,
    type): [count, bots]}."""
    merged: dict[Key, list[int]] = {}
    for r in rows:
        key = (r.app_id, r.stream, r.tag, r.template, bucket_floor(r.bucket, size), r.event_type)
        sums = merged.setdefault(key, [0, 0])
        sums[0] += r.count
        sums[1] += r.bot_count
    return merged


def _watermark_name(size: timedelta) -> str:
    return f"stats.compacted_until.{int(size.total_seconds())}"


def _watermark(conn: Connection, size: timedelta) -> datetime | None:
    value = conn.execute(
        select(system_values.c.value).where(system_values.c.name == _watermark_name(size))
    ).scalar()
    return None if value is None else datetime.fromisoformat(value)


def _set_watermark(conn: Connection, size: timedelta, at: datetime) -> None:
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(system_values).values(name=_watermark_name(size), value=at.isoformat())
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"value": at.isoformat()})
    )


def _compact_range(conn: Connection, start: datetime, end: datetime, size: timedelta) -> int:
    """Merge the rows of [start, end) into rows of `size`, in `conn`'s transaction; returns
    how many rows fewer there are."""
    if conn.dialect.name == "postgresql":
        # Two compactions reading the same rows would each add their sums.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    in_range = (stat_counters.c.bucket >= start, stat_counters.c.bucket < end)
    rows = conn.execute(select(stat_counters).where(*in_range)).all()
    merged = fold(rows, size)
    if len(merged) == len(rows):
        return 0  # already one row per bucket
    conn.execute(delete(stat_counters).where(*in_range))
    conn.execute(
        insert(stat_counters),
        [
            {
                "app_id": app_id,
                "stream": stream,
                "tag": tag,
                "template": template,
                "bucket": bucket,
                "event_type": kind,
                "count": n,
                "bot_count": bots,
            }
            for (app_id, stream, tag, template, bucket, kind), (n, bots) in merged.items()
        ],
    )
    return len(rows) - len(merged)


def compact(store: Store, *, now: datetime | None = None, everything: bool = False) -> int:
    """Merge aged counter rows as LEVELS says, a day of rows per transaction, each level from
    its watermark on (`everything`: from the oldest row, e.g. after a backfill of old
    events). Safe to run from several processes, and at any interval: rows not merged yet
    only cost reading time. Returns how many rows fewer there are."""
    now = now or utcnow()
    removed = 0
    for age, size in LEVELS:
        cutoff = bucket_floor(now - age, size)
        with store.read() as conn:
            start = None if everything else _watermark(conn, size)
            if start is None:
                oldest = conn.execute(select(func.min(stat_counters.c.bucket))).scalar()
                start = cutoff if oldest is None else bucket_floor(oldest, size)
        while start < cutoff:
            end = min(start + max(size, timedelta(days=1)), cutoff)
            with store.write() as conn:
                removed += _compact_range(conn, start, end, size)
                _set_watermark(conn, size, end)
            start = end
    return removed
