"""Keeps stat_counters small: minute rows older than two days are merged into hour rows."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from postbode.store.engine import Store
from postbode.store.schema import stat_counters, system_values, utcnow

# Charts finer than an hour only ever look back a day or two (24 h is shown by the quarter
# hour); past that, one row per hour instead of up to sixty keeps a 30-day dashboard a scan
# of tens of thousands of rows instead of a million. A custom window reaching further back
# than this sees whole hours at its edges.
KEEP_MINUTES = timedelta(hours=48)
WATERMARK = "stats.compacted_until"  # system_values: everything before is hour rows
_LOCK_KEY = 0x706273746174  # PostgreSQL advisory lock: one compaction at a time

Key = tuple[int, str, str, datetime, str]  # app, stream, tag, hour, event type


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def fold(rows: Iterable[Any]) -> dict[Key, list[int]]:
    """Counter rows summed per hour (pure): {(app, stream, tag, hour, type): [count, bots]}."""
    hours: dict[Key, list[int]] = {}
    for r in rows:
        key = (r.app_id, r.stream, r.tag, hour_of(r.bucket), r.event_type)
        sums = hours.setdefault(key, [0, 0])
        sums[0] += r.count
        sums[1] += r.bot_count
    return hours


def _watermark(conn: Connection) -> datetime | None:
    value = conn.execute(
        select(system_values.c.value).where(system_values.c.name == WATERMARK)
    ).scalar()
    return None if value is None else datetime.fromisoformat(value)


def _set_watermark(conn: Connection, at: datetime) -> None:
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(system_values).values(name=WATERMARK, value=at.isoformat())
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"value": at.isoformat()})
    )


def _compact_range(conn: Connection, start: datetime, end: datetime) -> int:
    """Merge the rows of [start, end) into hour rows, in `conn`'s transaction; returns how
    many rows fewer there are."""
    if conn.dialect.name == "postgresql":
        # Two compactions reading the same minutes would each add their sums.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    in_range = (stat_counters.c.bucket >= start, stat_counters.c.bucket < end)
    rows = conn.execute(select(stat_counters).where(*in_range)).all()
    hours = fold(rows)
    if len(hours) == len(rows):
        return 0  # already one row per hour
    conn.execute(delete(stat_counters).where(*in_range))
    conn.execute(
        insert(stat_counters),
        [
            {
                "app_id": app_id,
                "stream": stream,
                "tag": tag,
                "bucket": hour,
                "event_type": kind,
                "count": n,
                "bot_count": bots,
            }
            for (app_id, stream, tag, hour, kind), (n, bots) in hours.items()
        ],
    )
    return len(rows) - len(hours)


def compact(
    store: Store,
    *,
    now: datetime | None = None,
    keep: timedelta = KEEP_MINUTES,
    everything: bool = False,
) -> int:
    """Merge minute rows older than `keep` into hour rows, a day per transaction, from the
    watermark on (`everything`: from the oldest row, e.g. after a backfill of old events).
    Safe to run from several processes; returns how many rows fewer there are."""
    cutoff = hour_of((now or utcnow()) - keep)
    with store.read() as conn:
        start = None if everything else _watermark(conn)
        if start is None:
            oldest = conn.execute(select(func.min(stat_counters.c.bucket))).scalar()
            start = hour_of(oldest) if oldest is not None else cutoff
    removed = 0
    while start < cutoff:
        end = min(start + timedelta(days=1), cutoff)
        with store.write() as conn:
            removed += _compact_range(conn, start, end)
            _set_watermark(conn, end)
        start = end
    return removed
