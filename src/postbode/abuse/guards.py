"""The bounce-rate, complaint-rate and list-bombing guards: a periodic look at each app's
recent outcomes that holds the app's new mail and alerts when one is over its threshold."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, select

from postbode.abuse import alerts, hold
from postbode.config import Settings
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, deliveries, stat_counters, utcnow

__all__ = [
    "Thresholds",
    "Trip",
    "check_rates",
    "counts",
    "hard_bounces",
    "judge_bombing",
    "judge_bounces",
    "judge_complaints",
]

log = logging.getLogger(__name__)

DELIVERED = str(EventType.DELIVERY_DELIVERED)
BOUNCED = str(EventType.DELIVERY_BOUNCED)
COMPLAINED = str(EventType.MESSAGE_COMPLAINED)
UNKNOWN_USER = "user_unknown"  # bounces/classify.py's category of a mailbox that is not there
BOMBING_SCAN = 5000  # unknown-user bounces of one app looked at per check, at most


@dataclass(frozen=True)
class Thresholds:
    """When a guard trips (config.py documents each; docs/abuse.md the reasoning)."""

    bounce_rate: float = 0.10
    bounce_min: int = 200
    bounce_window: timedelta = timedelta(hours=1)
    complaint_rate: float = 0.003
    complaint_min: int = 1000
    complaint_window: timedelta = timedelta(hours=24)
    bombing_min_unknown: int = 50
    bombing_unknown_rate: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            bounce_rate=settings.abuse_bounce_rate,
            bounce_min=settings.abuse_bounce_min_deliveries,
            bounce_window=timedelta(minutes=settings.abuse_bounce_window_minutes),
            complaint_rate=settings.abuse_complaint_rate,
            complaint_min=settings.abuse_complaint_min_deliveries,
            complaint_window=timedelta(hours=settings.abuse_complaint_window_hours),
            bombing_min_unknown=settings.abuse_list_bombing_min_unknown,
            bombing_unknown_rate=settings.abuse_list_bombing_unknown_rate,
        )


@dataclass(frozen=True)
class Trip:
    """A guard over its threshold: the alert kind, the hold reason and the figures."""

    kind: str
    reason: str
    figures: dict[str, Any]


# -- the judgements: pure -----------------------------------------------------------------------


def judge_bounces(outcomes: int, hard_bounces: int, t: Thresholds) -> Trip | None:
    """`outcomes`: deliveries that ended (delivered or bounced) in the window."""
    if outcomes < t.bounce_min or outcomes <= 0:
        return None
    rate = hard_bounces / outcomes
    if rate <= t.bounce_rate:
        return None
    return Trip(
        "bounce_rate",
        f"hard-bounce rate {rate:.1%} of the last {outcomes} deliveries "
        f"(threshold {t.bounce_rate:.1%})",
        {
            "hard_bounces": hard_bounces,
            "deliveries": outcomes,
            "rate": round(rate, 4),
            "threshold": t.bounce_rate,
            "window_minutes": int(t.bounce_window.total_seconds() // 60),
        },
    )


def judge_complaints(delivered: int, complaints: int, t: Thresholds) -> Trip | None:
    if delivered < t.complaint_min or delivered <= 0:
        return None
    rate = complaints / delivered
    if rate <= t.complaint_rate:
        return None
    return Trip(
        "complaint_rate",
        f"complaint rate {rate:.2%} of {delivered} delivered (threshold {t.complaint_rate:.2%})",
        {
            "complaints": complaints,
            "delivered": delivered,
            "rate": round(rate, 5),
            "threshold": t.complaint_rate,
            "window_hours": int(t.complaint_window.total_seconds() // 3600),
        },
    )


def judge_bombing(domain: str, unknown_new: int, outcomes: int, t: Thresholds) -> Trip | None:
    """`unknown_new`: unknown-user bounces at `domain` for addresses the app never delivered to
    before; `outcomes`: the app's deliveries to `domain` that ended in the window."""
    if unknown_new < t.bombing_min_unknown or outcomes <= 0:
        return None
    rate = unknown_new / outcomes
    if rate <= t.bombing_unknown_rate:
        return None
    return Trip(
        "list_bombing",
        f"{unknown_new} never-seen addresses at {domain} unknown there "
        f"({rate:.0%} of {outcomes} deliveries to it)",
        {
            "domain": domain,
            "unknown_new_recipients": unknown_new,
            "deliveries": outcomes,
            "rate": round(rate, 4),
            "threshold": t.bombing_unknown_rate,
        },
    )


# -- reading the store -------------------------------------------------------------------------


def counts(
    conn: Connection, since: datetime, app_ids: list[int] | None
) -> dict[int, dict[str, int]]:
    query = (
        select(stat_counters.c.app_id, stat_counters.c.event_type, func.sum(stat_counters.c.count))
        .where(
            stat_counters.c.bucket >= since,
            stat_counters.c.event_type.in_((DELIVERED, BOUNCED, COMPLAINED)),
        )
        .group_by(stat_counters.c.app_id, stat_counters.c.event_type)
    )
    if app_ids is not None:
        query = query.where(stat_counters.c.app_id.in_(app_ids))
    found: dict[int, dict[str, int]] = {}
    for app_id, event_type, n in conn.execute(query):
        found.setdefault(app_id, {})[event_type] = int(n or 0)
    return found


def hard_bounces(conn: Connection, app_id: int, since: datetime) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(deliveries)
            .where(
                deliveries.c.app_id == app_id,
                deliveries.c.status == "bounced",
                deliveries.c.hard.is_(True),
                deliveries.c.updated_at >= since,
            )
        ).scalar_one()
    )


def _bombing(conn: Connection, app_id: int, since: datetime, t: Thresholds) -> Trip | None:
    """The domain with the most unknown-user bounces for never-seen addresses, judged."""
    earlier = deliveries.alias()  # Core: the ORM stays out of worker processes
    seen_before = (
        select(earlier.c.id)
        .where(
            earlier.c.app_id == app_id,
            earlier.c.recipient == deliveries.c.recipient,
            earlier.c.status == "delivered",
        )
        .exists()
    )
    unknown = (
        select(deliveries.c.recipient_domain, deliveries.c.recipient)
        .where(
            deliveries.c.app_id == app_id,
            deliveries.c.status == "bounced",
            deliveries.c.bounce_category == UNKNOWN_USER,
            deliveries.c.updated_at >= since,
            ~seen_before,
        )
        .limit(BOMBING_SCAN)
        .subquery()
    )
    per_domain = conn.execute(
        select(unknown.c.recipient_domain, func.count(func.distinct(unknown.c.recipient)))
        .group_by(unknown.c.recipient_domain)
        .order_by(func.count(func.distinct(unknown.c.recipient)).desc())
        .limit(5)
    ).all()
    for domain, unknown_new in per_domain:
        if unknown_new < t.bombing_min_unknown:
            break
        outcomes = conn.execute(
            select(func.count())
            .select_from(deliveries)
            .where(
                and_(
                    deliveries.c.app_id == app_id,
                    deliveries.c.status.in_(("delivered", "bounced")),
                    deliveries.c.recipient_domain == domain,
                    deliveries.c.updated_at >= since,
                )
            )
        ).scalar_one()
        trip = judge_bombing(domain, int(unknown_new), int(outcomes), t)
        if trip is not None:
            return trip
    return None


def judge_app(
    conn: Connection,
    app_id: int,
    now: datetime,
    t: Thresholds,
    released: datetime | None,
    known: Mapping[str, int] | None = None,
) -> Trip | None:
    """The first guard the app trips, reading what happened since the later of each window's
    start and its last release."""
    since_b = max(now - t.bounce_window, released) if released else now - t.bounce_window
    since_c = max(now - t.complaint_window, released) if released else now - t.complaint_window
    short = counts(conn, since_b, [app_id]).get(app_id, {})
    outcomes = short.get(DELIVERED, 0) + short.get(BOUNCED, 0)
    if short.get(BOUNCED, 0):
        trip = judge_bounces(outcomes, hard_bounces(conn, app_id, since_b), t)
        if trip is None:
            trip = _bombing(conn, app_id, since_b, t)
        if trip is not None:
            return trip
    long = known if known is not None and released is None else None
    if long is None:
        long = counts(conn, since_c, [app_id]).get(app_id, {})
    if long.get(COMPLAINED, 0):
        return judge_complaints(long.get(DELIVERED, 0), long[COMPLAINED], t)
    return None


def check_rates(
    store: Store, settings: Settings, now: datetime | None = None
) -> list[tuple[int, Trip]]:
    """The periodic task: judge every active, unheld app with bounces or complaints in its
    windows; hold and alert those over a threshold. Returns what tripped."""
    t = Thresholds.from_settings(settings)
    now = now or utcnow()
    widest = now - max(t.bounce_window, t.complaint_window)
    with store.read() as conn:
        recent = counts(conn, widest, None)
        candidates = [
            app_id for app_id, c in recent.items() if c.get(BOUNCED, 0) or c.get(COMPLAINED, 0)
        ]
        if not candidates:
            return []
        open_apps = set(
            conn.execute(
                select(apps.c.id).where(
                    apps.c.id.in_(candidates),
                    apps.c.status == "active",
                    apps.c.hold_reason.is_(None),
                )
            ).scalars()
        )
        released = hold.last_release(conn, sorted(open_apps))
        found: list[tuple[int, Trip]] = []
        for app_id in sorted(open_apps):
            # the widest window's counts serve the complaint window when it is the widest
            pre = recent[app_id] if t.complaint_window >= t.bounce_window else None
            last = released.get(app_id)
            trip = judge_app(conn, app_id, now, t, last.at if last else None, pre)
            if trip is not None:
                found.append((app_id, trip))
    for app_id, trip in found:
        with store.write() as conn:
            held = hold.hold_in(
                conn, app_id, trip.reason, hold.DETECTOR, now=now, data=trip.figures
            )
            alerts.raise_alert_in(conn, app_id, trip.kind, trip.figures, held=held, now=now)
        log.warning("app %d held: %s", app_id, trip.reason)
    return found
