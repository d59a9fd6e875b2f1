"""Peaks and dips: each app's and tag's volume and delivery rate in the hour just ended,
against its usual level for that hour, raised as `app.alert` (volume_drop, volume_spike,
delivery_rate_drop). A sudden silence of password-reset mail is as alarming as a spike."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from postbode.events.types import EventType
from postbode.stats.queries import bucket_floor
from postbode.store.engine import Store
from postbode.store.schema import app_alerts, apps, stat_counters, utcnow

HOUR = timedelta(hours=1)
DAYS_LOOKED_AT = 7  # the same hour on each of the previous days: the usual level
MIN_SAMPLES = 3  # days of history needed before an hour is judged at all
MIN_USUAL = 20  # a flow must usually send this many an hour for its silence to be a dip
DROP_RATIO = 0.25  # a dip: at most a quarter of the usual volume
SPIKE_RATIO = 3.0  # a peak: at least three times the usual volume …
MIN_SPIKE = 100  # … and at least this many messages in the hour
RATE_DROP = 0.20  # the delivery rate 20 points below its usual
MIN_OUTCOMES = 50  # deliveries decided in the hour before its rate is judged

RECEIVED = str(EventType.MESSAGE_RECEIVED)
DELIVERED = str(EventType.DELIVERY_DELIVERED)
BOUNCED = str(EventType.DELIVERY_BOUNCED)
FAILED = str(EventType.DELIVERY_FAILED)
TYPES = (RECEIVED, DELIVERED, BOUNCED, FAILED)

ALL_TAGS = "*"  # the flow of the whole app, every tag together


@dataclass(frozen=True)
class Finding:
    """An hour of one app's flow (a tag, or ALL_TAGS) far from its usual level."""

    app_id: int
    tag: str
    kind: str  # volume_drop | volume_spike | delivery_rate_drop
    hour: datetime  # the hour's start (UTC)
    observed: float
    usual: float
    week_ago: float | None

    def figures(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "tag": "(all tags)" if self.tag == ALL_TAGS else (self.tag or "(untagged)"),
            "hour": self.hour.isoformat(),
            "observed": round(self.observed, 3),
            "usual": round(self.usual, 3),
        }
        if self.week_ago is not None:
            found["week_ago"] = round(self.week_ago, 3)
        return found

    @property
    def size(self) -> float:
        """How far off: the ratio between what was seen and what is usual."""
        low, high = sorted((self.observed, self.usual))
        return (high + 1) / (low + 1)


# -- judging (pure) ------------------------------------------------------------------------------


def usual_level(days: Sequence[float]) -> float | None:
    """The median of the same hour on the previous days; None with too little history."""
    return statistics.median(days) if len(days) >= MIN_SAMPLES else None


def judge_volume(
    observed: int, days: Sequence[int], week_ago: int | None
) -> tuple[str, float] | None:
    """`volume_drop` or `volume_spike` with the usual level, or None. An hour is unusual only
    if it is so against the same hour of the previous days and, when there is one, of the
    same weekday last week (so a weekly rhythm, quiet Sundays, raises nothing)."""
    usual = usual_level(days)
    if usual is None:
        return None
    references = [usual] if week_ago is None else [usual, float(week_ago)]
    if all(ref >= MIN_USUAL and observed <= ref * DROP_RATIO for ref in references):
        return "volume_drop", usual
    if observed >= MIN_SPIKE and all(observed >= max(ref, 1.0) * SPIKE_RATIO for ref in references):
        return "volume_spike", usual
    return None


def judge_rate(
    delivered: int, decided: int, usual_delivered: int, usual_decided: int
) -> tuple[str, float, float] | None:
    """`delivery_rate_drop` with this hour's and the usual rate, or None."""
    if decided < MIN_OUTCOMES or usual_decided < MIN_OUTCOMES:
        return None
    rate, usual = delivered / decided, usual_delivered / usual_decided
    if rate <= usual - RATE_DROP:
        return "delivery_rate_drop", rate, usual
    return None


Counts = Mapping[tuple[int, str, str, datetime], int]  # (app, tag, event type, hour) -> count


def find(
    counts: Counts, hour: datetime, first_seen: Mapping[int, datetime] | None = None
) -> list[Finding]:
    """Every flow (app and tag, and the app as a whole) unusual in `hour`, from hourly counts
    covering it and the DAYS_LOOKED_AT days before; `first_seen`: each app's oldest counted
    hour (last week's hour is a reference only if the app was counted then)."""
    flows: dict[tuple[int, str], dict[tuple[str, datetime], int]] = {}
    for (app_id, tag, kind, at), n in counts.items():
        for key in ((app_id, tag), (app_id, ALL_TAGS)):
            by = flows.setdefault(key, {})
            by[(kind, at)] = by.get((kind, at), 0) + n
    days = [hour - timedelta(days=d) for d in range(1, DAYS_LOOKED_AT + 1)]
    week = hour - timedelta(days=7)
    found: list[Finding] = []
    for (app_id, tag), by in sorted(flows.items()):
        start = (first_seen or {}).get(app_id)
        seen_days = [d for d in days if start is None or d >= start]
        received = [by.get((RECEIVED, d), 0) for d in seen_days]
        week_ago = by.get((RECEIVED, week), 0) if start is not None and week >= start else None
        verdict = judge_volume(by.get((RECEIVED, hour), 0), received, week_ago)
        if verdict is not None:
            kind, usual = verdict
            found.append(
                Finding(app_id, tag, kind, hour, by.get((RECEIVED, hour), 0), usual, week_ago)
            )

        now_ok, now_all = _decided(by, hour)
        past = [_decided(by, d) for d in seen_days]
        rate = judge_rate(now_ok, now_all, sum(p[0] for p in past), sum(p[1] for p in past))
        if rate is not None and len(past) >= MIN_SAMPLES:
            found.append(Finding(app_id, tag, rate[0], hour, rate[1], rate[2], None))
    return found


def _decided(by: Mapping[tuple[str, datetime], int], at: datetime) -> tuple[int, int]:
    """(delivered, delivered + bounced + failed) in the hour `at`."""
    ok = by.get((DELIVERED, at), 0)
    return ok, ok + by.get((BOUNCED, at), 0) + by.get((FAILED, at), 0)


# -- reading the counters and raising the alerts --------------------------------------------------


def hours_read(hour: datetime) -> list[datetime]:
    """The hours `find` needs: the hour judged and the same hour on the days before."""
    return [hour - timedelta(days=d) for d in range(DAYS_LOOKED_AT + 1)]


def read_counts(conn: Connection, hours: Iterable[datetime]) -> dict[Any, int]:
    """Counts per (app, tag, event type, hour) for these hours (counter rows of any size
    within an hour: minutes, quarters or the hour itself; stats.rollup keeps hours for 9 days)."""
    hours = sorted(set(hours))
    ranges = [and_(stat_counters.c.bucket >= h, stat_counters.c.bucket < h + HOUR) for h in hours]
    rows = conn.execute(
        select(
            stat_counters.c.app_id,
            stat_counters.c.tag,
            stat_counters.c.event_type,
            stat_counters.c.bucket,
            stat_counters.c.count,
        ).where(stat_counters.c.event_type.in_(TYPES), or_(*ranges))
    )
    counts: dict[Any, int] = {}
    for app_id, tag, kind, bucket, n in rows:
        key = (app_id, tag or "", kind, bucket_floor(bucket, HOUR))
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def first_counted(conn: Connection, since: datetime) -> dict[int, datetime]:
    """Each app's oldest counter hour at or after `since` (an app newer than that has no
    history before it: its hours there are unknown, not silent)."""
    rows = conn.execute(
        select(stat_counters.c.app_id, func.min(stat_counters.c.bucket))
        .where(stat_counters.c.bucket >= since)
        .group_by(stat_counters.c.app_id)
    )
    found = {}
    for app_id, at in rows:
        if isinstance(at, str):  # SQLite's min() over the stored text
            at = datetime.fromisoformat(at)
        found[int(app_id)] = bucket_floor(at, HOUR)
    return found


def detect(store: Store, *, now: datetime | None = None) -> list[Finding]:
    """The findings for the hour that ended last (nothing is raised)."""
    hour = bucket_floor(now or utcnow(), HOUR) - HOUR
    with store.read() as conn:
        counts = read_counts(conn, hours_read(hour))
        first = first_counted(conn, hour - timedelta(days=DAYS_LOOKED_AT + 1))
        # A suspended app's silence is its operator's doing, not news.
        active = set(conn.execute(select(apps.c.id).where(apps.c.status != "suspended")).scalars())
    return [f for f in find(counts, hour, first) if f.app_id in active]


def check(store: Store, *, now: datetime | None = None) -> list[Finding]:
    """Raise an `app.alert` for the hour that ended last: per app and kind the largest
    finding, with the other flows that went the same way (at most one alert per app, kind
    and hour: abuse.alerts keeps that across nodes)."""
    from postbode.abuse.alerts import raise_alert

    findings = detect(store, now=now)
    by: dict[tuple[int, str], list[Finding]] = {}
    for f in findings:
        by.setdefault((f.app_id, f.kind), []).append(f)
    raised = []
    for (app_id, kind), group in sorted(by.items()):
        group.sort(key=lambda f: (f.tag != ALL_TAGS, -f.size))
        top = group[0]
        figures = top.figures()
        others = [f.figures()["tag"] for f in group[1:]]
        if others:
            figures["also"] = ", ".join(others)
        if raise_alert(store, app_id, kind, figures, now=now) is not None:
            raised.append(top)
    return raised


KINDS = ("volume_drop", "volume_spike", "delivery_rate_drop")


def marks(
    conn: Connection, app_ids: Sequence[int], since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """The peaks and dips raised for hours in [since, until), oldest first, for a chart:
    {app_id, kind, tag, hour, observed, usual}."""
    rows = conn.execute(
        select(app_alerts.c.app_id, app_alerts.c.kind, app_alerts.c.figures)
        .where(
            app_alerts.c.app_id.in_(list(app_ids)),
            app_alerts.c.kind.in_(KINDS),
            # Raised within minutes after the hour they are about.
            app_alerts.c.created_at >= since,
            app_alerts.c.created_at < until + 2 * HOUR,
        )
        .order_by(app_alerts.c.created_at, app_alerts.c.id)
    )
    found = []
    for r in rows:
        figures = dict(r.figures or {})
        try:
            hour = datetime.fromisoformat(str(figures.get("hour")))
        except ValueError:
            continue
        if since - HOUR < hour < until:
            found.append(
                {
                    "app_id": r.app_id,
                    "kind": r.kind,
                    "tag": figures.get("tag", ""),
                    "hour": hour,
                    "observed": figures.get("observed"),
                    "usual": figures.get("usual"),
                }
            )
    return found
