"""Spike detection: each app's (and each of its tags') sending rate over the last minute against
its own baseline for that hour of the week; a burst far above it holds the app's new mail."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select

from postbode.abuse import alerts, hold
from postbode.config import Settings
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, stat_counters, utcnow

__all__ = [
    "Spike",
    "SpikeSettings",
    "SpikeWatch",
    "baseline",
    "check_spikes",
    "current_rates",
    "judge",
]

log = logging.getLogger(__name__)

RECEIVED = str(EventType.MESSAGE_RECEIVED)
WEEKS = 4  # earlier weeks the baseline looks at, each the same hour of the week
EWMA_ALPHA = 0.5  # weight of the newest week against the ones before
HOURLY_UNTIL = timedelta(hours=52)  # statistics keep hourly rows this long (stats/rollup.py)
DAILY_AFTER = timedelta(days=9)  # and daily rows after this age
HISTORY_CACHE_SECONDS = 600.0  # how long the accept path remembers that an app has no history


@dataclass(frozen=True)
class SpikeSettings:
    factor: float = 10.0  # a spike: above factor times the baseline …
    floor: float = 100.0  # … and above this many messages a minute, whatever the baseline
    new_app: float = 0.0  # an app (or tag) without any history: above this; 0: not judged

    @classmethod
    def from_settings(cls, settings: Settings) -> SpikeSettings:
        return cls(
            settings.abuse_spike_factor,
            settings.abuse_spike_floor_per_minute,
            settings.abuse_spike_new_app_per_minute,
        )


@dataclass(frozen=True)
class Spike:
    app_id: int
    tag: str | None  # None: the app's whole mail
    per_minute: float
    baseline: float | None
    threshold: float

    @property
    def reason(self) -> str:
        what = f"tag {self.tag!r}" if self.tag is not None else "sending rate"
        return (
            f"{what} {self.per_minute:.0f}/min against a baseline of "
            + (f"{self.baseline:.1f}/min" if self.baseline is not None else "none (new)")
            + f" (threshold {self.threshold:.0f}/min)"
        )

    @property
    def figures(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "per_minute": round(self.per_minute, 1),
            "baseline_per_minute": round(self.baseline, 2) if self.baseline is not None else None,
            "threshold_per_minute": round(self.threshold, 1),
        }
        if self.tag is not None:
            found["tag"] = self.tag
        return found


def judge(per_minute: float, base: float | None, s: SpikeSettings) -> float | None:
    """The threshold `per_minute` is over, or None: above `factor` times the baseline and above
    the floor; without any history (`base` None), above `new_app` (0: not judged)."""
    if base is None:
        if not s.new_app:
            return None
        threshold = s.new_app
    else:
        threshold = max(s.floor, s.factor * base)
    return threshold if per_minute > threshold else None


def ewma(values: list[float], alpha: float = EWMA_ALPHA) -> float:
    """Exponentially weighted mean, oldest first (the newest weighs `alpha`)."""
    mean: float | None = None
    for value in values:
        mean = value if mean is None else alpha * value + (1 - alpha) * mean
    return mean or 0.0


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def current_rates(
    conn: Connection, now: datetime, app_id: int | None = None
) -> dict[tuple[int, str], float]:
    """Messages received over the last minute per (app, tag): this minute's count and the part
    of the last minute's that falls within 60 seconds (the counters are per minute)."""
    this = _minute(now)
    last = this - timedelta(minutes=1)
    rows = conn.execute(
        select(
            stat_counters.c.app_id,
            stat_counters.c.tag,
            stat_counters.c.bucket,
            func.sum(stat_counters.c.count),
        )
        .where(
            stat_counters.c.event_type == RECEIVED,
            stat_counters.c.bucket >= last,
            *([stat_counters.c.app_id == app_id] if app_id is not None else []),
        )
        .group_by(stat_counters.c.app_id, stat_counters.c.tag, stat_counters.c.bucket)
    )
    elapsed = (now - this).total_seconds() / 60.0
    rates: dict[tuple[int, str], float] = defaultdict(float)
    for app_id, tag, bucket, n in rows:
        bucket = bucket if bucket.tzinfo else bucket.replace(tzinfo=now.tzinfo)
        rates[(app_id, tag or "")] += float(n) * (1.0 - elapsed if bucket < this else 1.0)
    return dict(rates)


def baseline(conn: Connection, app_id: int, tag: str | None, now: datetime) -> float | None:
    """The app's (or tag's) messages a minute in this hour of the week: an EWMA over the last
    WEEKS weeks' same hour, weeks before the app sent anything left out. Weeks old enough that
    the statistics keep only daily rows count that day's mean rate."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    values: list[float] = []
    for weeks_ago in range(WEEKS, 0, -1):
        start = hour - timedelta(weeks=weeks_ago)
        if now - start > DAILY_AFTER:
            start, end, minutes = (
                start.replace(hour=0),
                start.replace(hour=0) + timedelta(days=1),
                1440.0,
            )
        else:
            end, minutes = start + timedelta(hours=1), 60.0
        query = select(func.sum(stat_counters.c.count)).where(
            stat_counters.c.app_id == app_id,
            stat_counters.c.event_type == RECEIVED,
            stat_counters.c.bucket >= start,
            stat_counters.c.bucket < end,
        )
        if tag is not None:
            query = query.where(stat_counters.c.tag == tag)
        total = conn.execute(query).scalar()
        if total is None:
            continue  # the app did not exist yet (or sent nothing): no sample
        values.append(float(total) / minutes)
    return ewma(values) if values else None  # None: no history at all


def find_spikes(
    conn: Connection, now: datetime, s: SpikeSettings, app_id: int | None = None
) -> list[Spike]:
    """Spikes of active, unheld apps (the app's whole mail first, then its tags); with
    `app_id`, of that app only."""
    rates = current_rates(conn, now, app_id)
    totals: dict[int, float] = defaultdict(float)
    for (app_id, _), rate in rates.items():
        totals[app_id] += rate
    busy = {a for (a, _), r in rates.items() if r > s.floor} | {
        a for a, r in totals.items() if r > s.floor
    }
    if not busy:
        return []
    open_apps = set(
        conn.execute(
            select(apps.c.id).where(
                apps.c.id.in_(sorted(busy)), apps.c.status == "active", apps.c.hold_reason.is_(None)
            )
        ).scalars()
    )
    released = hold.last_release(conn, sorted(open_apps))
    found: list[Spike] = []
    for app in sorted(open_apps):
        release = released.get(app)
        if release is not None and timedelta(0) <= now - release.at < timedelta(minutes=2):
            # Just released: what was counted before the release does not count again.
            total, by_tag = current_rates_since(conn, app, release)
        else:
            total = totals.get(app, 0.0)
            by_tag = {t: r for (a, t), r in rates.items() if a == app}
        if total > s.floor:
            base = baseline(conn, app, None, now)
            threshold = judge(total, base, s)
            if threshold is not None:
                found.append(Spike(app, None, total, base, threshold))
                continue
        for tag, rate in sorted(by_tag.items()):
            if rate <= s.floor:
                continue
            base = baseline(conn, app, tag, now)
            threshold = judge(rate, base, s)
            if threshold is not None:
                found.append(Spike(app, tag or None, rate, base, threshold))
                break
    return found


def current_rates_since(
    conn: Connection, app_id: int, release: hold.Release
) -> tuple[float, dict[str, float]]:
    """Messages received since a release (in the last two minutes), per tag: the minute
    buckets from the release's on, less what its minute held when the app was released."""
    rows = conn.execute(
        select(stat_counters.c.tag, func.sum(stat_counters.c.count))
        .where(
            stat_counters.c.app_id == app_id,
            stat_counters.c.event_type == RECEIVED,
            stat_counters.c.bucket >= _minute(release.at),
        )
        .group_by(stat_counters.c.tag)
    )
    by_tag: dict[str, float] = {}
    for tag, n in rows:
        key = tag or ""
        by_tag[key] = max(0.0, float(n) - release.minute.get(key, 0))
    return sum(by_tag.values()), by_tag


def check_spikes(store: Store, settings: Settings, now: datetime | None = None) -> list[Spike]:
    """The periodic task: hold and alert every app (or tag) sending far above its baseline."""
    return _check(store, SpikeSettings.from_settings(settings), now or utcnow(), None)


def _check(store: Store, s: SpikeSettings, now: datetime, app_id: int | None) -> list[Spike]:
    with store.read() as conn:
        found = find_spikes(conn, now, s, app_id)
    for spike in found:
        with store.write() as conn:
            held = hold.hold_in(
                conn, spike.app_id, spike.reason, hold.DETECTOR, now=now, data=spike.figures
            )
            alerts.raise_alert_in(conn, spike.app_id, "spike", spike.figures, held=held, now=now)
        log.warning("app %d held: %s", spike.app_id, spike.reason)
    return found


class SpikeWatch:
    """The accept path's look-out: after every `step` messages this process accepted for an
    app, it judges the app's rate over the last minute as the store counts it (every node's
    mail, so the decision is the same wherever it is made). A burst of 50 messages a second is
    held within about floor + step messages, long before the periodic task's next turn."""

    def __init__(self, store: Store, settings: SpikeSettings | None = None, step: int = 25):
        self.store = store
        self.settings = settings
        self.step = step
        self._counts: dict[int, int] = defaultdict(int)
        self._history: dict[int, tuple[bool, float]] = {}  # app -> (has history, checked at)
        self._lock = threading.Lock()

    def seen(self, app_ids: Iterable[int]) -> None:
        """Messages of these apps were just stored (one entry per message)."""
        due: list[int] = []
        with self._lock:
            for app_id in app_ids:
                self._counts[app_id] += 1
                if self._counts[app_id] >= self.step:
                    self._counts[app_id] = 0
                    due.append(app_id)
        for app_id in sorted(set(due)):
            try:
                s = self._settings()
                if not s.new_app and not self._has_history(app_id):
                    continue  # not judged: no need to read its rates
                _check(self.store, s, utcnow(), app_id)
            except Exception:  # a look-out that fails must not fail the accept
                log.exception("spike check of app %d failed", app_id)

    def _has_history(self, app_id: int) -> bool:
        """Whether the app sent anything in the weeks the baseline looks at (cached)."""
        now = time.monotonic()
        known = self._history.get(app_id)
        if known is not None and now - known[1] < HISTORY_CACHE_SECONDS:
            return known[0]
        since = utcnow() - timedelta(weeks=WEEKS, hours=1)
        with self.store.read() as conn:
            found = conn.execute(
                select(stat_counters.c.app_id)
                .where(
                    stat_counters.c.app_id == app_id,
                    stat_counters.c.event_type == RECEIVED,
                    stat_counters.c.bucket >= since,
                    stat_counters.c.bucket < utcnow() - timedelta(days=6),
                )
                .limit(1)
            ).first()
        if len(self._history) > 10_000:
            self._history.clear()
        self._history[app_id] = (found is not None, now)
        return found is not None

    def _settings(self) -> SpikeSettings:
        if self.settings is None:
            from postbode.config import get_settings

            self.settings = SpikeSettings.from_settings(get_settings())
        return self.settings
