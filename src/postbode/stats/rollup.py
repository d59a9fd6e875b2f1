"""Keeps stat_counters and bounce_counters small: minute rows are merged into quarter-hour, hour
and day rows as they age, at the resolution the charts over them use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, delete, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from postbode.stats.queries import bucket_floor
from postbode.store.engine import Store
from postbode.store.schema import bounce_counters, stat_counters, system_values, utcnow

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


@dataclass(frozen=True)
class _Kind:
    """A table of counters: its key columns (with `bucket`), its summed columns, and the name
    its watermarks are kept under."""

    table: Table
    sums: tuple[str, ...]
    watermark: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.table.primary_key.columns)


KINDS = (
    _Kind(stat_counters, ("count", "bot_count"), "stats.compacted_until"),
    _Kind(bounce_counters, ("count",), "stats.bounces_compacted_until"),
)


def fold(rows: Iterable[Any], size: timedelta) -> dict[Key, list[int]]:
    """Counter rows summed per bucket of `size` (pure): {(app, stream, tag, template, bucket,
    type): [count, bots]}."""
    merged = _fold(rows, size, KINDS[0])
    return {(k[0], k[1], k[2], k[3], k[4], k[5]): v for k, v in merged.items()}


def _fold(rows: Iterable[Any], size: timedelta, kind: _Kind) -> dict[tuple[Any, ...], list[int]]:
    """Rows of `kind`'s table summed per bucket of `size` (pure), keyed by its key columns."""
    keys, sums = kind.keys, kind.sums
    merged: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        key = tuple(
            bucket_floor(r.bucket, size) if name == "bucket" else getattr(r, name) for name in keys
        )
        cell = merged.get(key)
        if cell is None:
            merged[key] = [getattr(r, name) for name in sums]
        else:
            for i, name in enumerate(sums):
                cell[i] += getattr(r, name)
    return merged


def _watermark_name(size: timedelta, kind: _Kind = KINDS[0]) -> str:
    return f"{kind.watermark}.{int(size.total_seconds())}"


def _watermark(conn: Connection, size: timedelta, kind: _Kind) -> datetime | None:
    value = conn.execute(
        select(system_values.c.value).where(system_values.c.name == _watermark_name(size, kind))
    ).scalar()
    return None if value is None else datetime.fromisoformat(value)


def _set_watermark(conn: Connection, size: timedelta, at: datetime, kind: _Kind) -> None:
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    name = _watermark_name(size, kind)
    stmt = dialect.insert(system_values).values(name=name, value=at.isoformat())
    conn.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"value": at.isoformat()})
    )


def _compact_range(
    conn: Connection, start: datetime, end: datetime, size: timedelta, kind: _Kind = KINDS[0]
) -> int:
    """Merge the rows of [start, end) into rows of `size`, in `conn`'s transaction; returns
    how many rows fewer there are."""
    if conn.dialect.name == "postgresql":
        # Two compactions reading the same rows would each add their sums.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    table = kind.table
    in_range = (table.c.bucket >= start, table.c.bucket < end)
    rows = conn.execute(select(table).where(*in_range)).all()
    merged = _fold(rows, size, kind)
    if len(merged) == len(rows):
        return 0  # already one row per bucket
    conn.execute(delete(table).where(*in_range))
    names = (*kind.keys, *kind.sums)
    conn.execute(
        insert(table),
        [dict(zip(names, (*key, *sums), strict=True)) for key, sums in merged.items()],
    )
    return len(rows) - len(merged)


def compact(store: Store, *, now: datetime | None = None, everything: bool = False) -> int:
    """Merge aged counter rows (stat_counters and bounce_counters) as LEVELS says, a day of
    rows per transaction, each level from its watermark on (`everything`: from the oldest row,
    e.g. after a backfill of old events). Safe to run from several processes, and at any
    interval: rows not merged yet only cost reading time. Returns how many rows fewer there
    are."""
    now = now or utcnow()
    removed = 0
    for kind in KINDS:
        for age, size in LEVELS:
            cutoff = bucket_floor(now - age, size)
            with store.read() as conn:
                start = None if everything else _watermark(conn, size, kind)
                if start is None:
                    oldest = conn.execute(select(func.min(kind.table.c.bucket))).scalar()
                    start = cutoff if oldest is None else bucket_floor(oldest, size)
            while start < cutoff:
                end = min(start + max(size, timedelta(days=1)), cutoff)
                with store.write() as conn:
                    removed += _compact_range(conn, start, end, size, kind)
                    _set_watermark(conn, size, end, kind)
                start = end
    return removed
