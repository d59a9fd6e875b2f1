"""Retry timing for deliveries: the remote's "try again in N" hint and expiry (the backoff
itself is the runner's, shared by every queue)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

__all__ = ["is_expired", "retry_hint"]

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}

# Phrasings seen in 4xx replies (greylisting, rate limits): "try again in 5 minutes",
# "please retry after 300 seconds", "wait 10 min", "greylisted for 60s", "retry in 1h".
_HINT = re.compile(
    r"""
    (?:
        try\s+(?:again\s+)?(?:in|after)
      | retry\s+(?:again\s+)?(?:in|after)
      | again\s+in
      | wait(?:\s+for)?
      | (?:greylisted|graylisted|deferred|delayed|blocked)\s+for
    )
    \s+(?:at\s+least\s+|another\s+|about\s+)?
    (?P<number>[0-9]+(?:\.[0-9]+)?)(?![0-9.])     # not part of "4.7.1" or an IP
    \s*
    (?P<unit>seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h)?
    \b
    """,
    re.IGNORECASE | re.VERBOSE,
)


def retry_hint(reply_text: str) -> float | None:
    """The wait in seconds a reply asks for ("try again in 5 minutes" → 300.0), or None.

    A number without a unit counts as seconds ("retry after 60").
    """
    match = _HINT.search(reply_text)
    if match is None:
        return None
    unit = (match.group("unit") or "s").lower()
    return float(match.group("number")) * _UNITS[unit]


def is_expired(
    first_queued_at: datetime | float,
    now: datetime | float,
    max_age: float | timedelta,
) -> bool:
    """True when a delivery queued at `first_queued_at` is `max_age` old or older at `now`.

    Times are both datetimes (both naive or both aware) or both epoch seconds; `max_age`
    is seconds or a timedelta.
    """
    limit = max_age.total_seconds() if isinstance(max_age, timedelta) else float(max_age)
    if isinstance(first_queued_at, datetime) and isinstance(now, datetime):
        age = (now - first_queued_at).total_seconds()
    elif isinstance(first_queued_at, datetime) or isinstance(now, datetime):
        raise TypeError("first_queued_at and now must both be datetimes or both be numbers")
    else:
        age = float(now) - float(first_queued_at)
    return age >= limit
