"""Retry timing for every leased queue: exponential backoff with jitter, a remote's hint as a
lower bound, and a cap. Pure: the runner, delivery and webhooks all take their delays here."""

from __future__ import annotations

import math
import random

__all__ = ["BASE_DELAY", "DEFAULT_CAP", "JITTER", "next_attempt_delay"]

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
