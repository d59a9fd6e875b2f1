"""The figures behind the detectors, per app, for people: the rate over the last minute against
the baseline and the spike threshold, and the bounce and complaint rates against theirs."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from postbode.abuse import guards, hold, spikes
from postbode.config import Settings
from postbode.store.schema import utcnow

__all__ = ["app_figures"]


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def app_figures(
    conn: Connection, app_ids: list[int], settings: Settings, now: datetime | None = None
) -> dict[int, dict[str, Any]]:
    """For each app: `per_minute`, `baseline_per_minute` (None: no history), `spike_threshold`
    (None: not judged), and the bounce and complaint figures with their thresholds, counted
    since the later of each window's start and the app's last release."""
    now = now or utcnow()
    s = spikes.SpikeSettings.from_settings(settings)
    t = guards.Thresholds.from_settings(settings)
    rates: dict[int, float] = defaultdict(float)
    for (app_id, _), rate in spikes.current_rates(conn, now).items():
        rates[app_id] += rate
    released = hold.last_release(conn, app_ids)
    found: dict[int, dict[str, Any]] = {}
    for app_id in app_ids:
        base = spikes.baseline(conn, app_id, None, now)
        if base is None:
            threshold: float | None = s.new_app or None
        else:
            threshold = max(s.floor, s.factor * base)
        release = released.get(app_id)
        since_b = now - t.bounce_window
        since_c = now - t.complaint_window
        if release is not None:
            since_b, since_c = max(since_b, release.at), max(since_c, release.at)
        short = guards.counts(conn, since_b, [app_id]).get(app_id, {})
        long = guards.counts(conn, since_c, [app_id]).get(app_id, {})
        outcomes = short.get(guards.DELIVERED, 0) + short.get(guards.BOUNCED, 0)
        hard = guards.hard_bounces(conn, app_id, since_b) if short.get(guards.BOUNCED) else 0
        delivered = long.get(guards.DELIVERED, 0)
        complaints = long.get(guards.COMPLAINED, 0)
        found[app_id] = {
            "per_minute": round(rates.get(app_id, 0.0), 1),
            "baseline_per_minute": round(base, 2) if base is not None else None,
            "spike_threshold_per_minute": threshold,
            "deliveries": outcomes,
            "hard_bounces": hard,
            "bounce_rate": _rate(hard, outcomes),
            "bounce_threshold": t.bounce_rate,
            "bounce_min_deliveries": t.bounce_min,
            "delivered": delivered,
            "complaints": complaints,
            "complaint_rate": _rate(complaints, delivered),
            "complaint_threshold": t.complaint_rate,
            "complaint_min_deliveries": t.complaint_min,
        }
    return found
