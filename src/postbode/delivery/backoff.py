"""Retry timing for deliveries: exponential backoff, the remote's hint, and expiry."""

from __future__ import annotations

import math
import random
import re
from datetime import datetime, timedelta

__all__ = [
    "BASE_DELAY",
    "DEFAULT_CAP",
    "JITTER",
    "is_expired",
    "next_attempt_delay",
    "retry_hint",
]

BASE_DELAY = 60.0
"""Seconds to wait after the first failed attempt."""

DEFAULT_CAP = 2 * 3600.0
"""Longest wait between attempts (settings.retry_cap_seconds overrides it)."""

JITTER = 0.25
"""Jitter takes up to this fraction off a delay, so deferred mail does not retry in step."""

# 2**20 minutes is two years: far past any cap, and keeps the float arithmetic finite.
_MAX_EXPONENT = 20


def next_attempt_delay(
    attempts: int,
    hint: float | None = None,
    cap: float = DEFAULT_CAP,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next attempt, after `attempts` failed attempts.

    BASE_DELAY doubled per attempt (60 s, 120 s, 240 s ...), never above `cap`. With an
    `rng`, up to JITTER of the delay is taken off at random; without one the result is
    deterministic and non-decreasing in `attempts`. A remote `hint` ("try again in
    N") is a lower bound, but the cap still wins: we never wait longer than `cap`.
    """
    cap = max(0.0, cap)
    exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
    delay = min(BASE_DELAY * 2.0**exponent, cap)
    if rng is not None:
        delay *= 1.0 - JITTER * rng.random()
    if hint is not None and math.isfinite(hint) and hint > delay:
        delay = hint
    return min(delay, cap)


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
