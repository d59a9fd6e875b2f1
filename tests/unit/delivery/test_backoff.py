"""Tests for retry timing: the shape of the backoff curve, hints and expiry."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbode.delivery.backoff import is_expired, retry_hint
from postbode.runner.backoff import (
    BASE_DELAY,
    DEFAULT_CAP,
    JITTER,
    next_attempt_delay,
)


def test_starts_near_a_minute_and_doubles() -> None:
    assert [next_attempt_delay(n) for n in (1, 2, 3, 4)] == [60.0, 120.0, 240.0, 480.0]
    assert BASE_DELAY == 60.0


def test_default_cap_is_two_hours() -> None:
    assert DEFAULT_CAP == 7200.0
    assert next_attempt_delay(50) == 7200.0
    assert next_attempt_delay(10_000) == 7200.0  # no overflow


def test_zero_or_negative_attempts_count_as_the_first() -> None:
    assert next_attempt_delay(0) == next_attempt_delay(-3) == next_attempt_delay(1)


@given(st.integers(min_value=-5, max_value=500), st.floats(min_value=1, max_value=1e6))
def test_monotone_non_decreasing_without_jitter(attempts: int, cap: float) -> None:
    assert next_attempt_delay(attempts, cap=cap) <= next_attempt_delay(attempts + 1, cap=cap)


@given(
    st.integers(min_value=-5, max_value=500),
    st.floats(min_value=0, max_value=1e6),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.integers(),
)
def test_cap_is_never_exceeded(attempts: int, cap: float, hint: float | None, seed: int) -> None:
    delay = next_attempt_delay(attempts, hint, cap, random.Random(seed))
    assert 0 <= delay <= cap


@given(st.integers(min_value=1, max_value=500), st.integers())
def test_jitter_is_bounded(attempts: int, seed: int) -> None:
    plain = next_attempt_delay(attempts)
    jittered = next_attempt_delay(attempts, rng=random.Random(seed))
    assert plain * (1 - JITTER) <= jittered <= plain


def test_jitter_spreads_retries() -> None:
    rng = random.Random(7)
    delays = {next_attempt_delay(3, rng=rng) for _ in range(20)}
    assert len(delays) > 10


def test_hint_is_a_lower_bound() -> None:
    assert next_attempt_delay(1, hint=300.0) == 300.0
    # A hint shorter than our own backoff does not make us retry sooner.
    assert next_attempt_delay(5, hint=10.0) == next_attempt_delay(5)
    assert next_attempt_delay(1, hint=300.0, rng=random.Random(1)) == 300.0


def test_hint_is_capped() -> None:
    assert next_attempt_delay(1, hint=86_400.0) == DEFAULT_CAP
    assert next_attempt_delay(1, hint=900.0, cap=600.0) == 600.0


def test_nonsense_hints_are_ignored() -> None:
    for hint in (float("nan"), float("inf"), -5.0):
        assert next_attempt_delay(2, hint=hint) == 120.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisted, please try again in 300 seconds", 300.0),
        ("Try again in 5 minutes", 300.0),
        ("try again in 1 hour", 3600.0),
        ("Try again in 2 hrs", 7200.0),
        ("please retry after 60", 60.0),
        ("Retry after 90 sec", 90.0),
        ("retry in 30s", 30.0),
        ("wait 5 min", 300.0),
        ("Please wait for 10 minutes before retrying", 600.0),
        ("Greylisted for 59 seconds (see http://postgrey.example/)", 59.0),
        ("rate limited, try again after 1.5 minutes", 90.0),
        ("Mailbox busy; try again in at least 120 seconds", 120.0),
        ("deferred for 2h", 7200.0),
    ],
)
def test_retry_hint_phrasings(text: str, seconds: float) -> None:
    assert retry_hint(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "4.7.1 Greylisted, see http://postgrey.schweikert.ch/help/dest.test.html",
        "Server busy. Please try again later from [192.0.2.1].",
        "4.2.2 Mailbox full",
        "try again in 4.7.1 ways",
        "Service unavailable, try again in 10.0.0.1",
    ],
)
def test_retry_hint_absent(text: str) -> None:
    assert retry_hint(text) is None


def test_is_expired_with_datetimes() -> None:
    queued = datetime(2025, 1, 1, tzinfo=UTC)
    max_age = timedelta(days=3)
    assert not is_expired(queued, queued + timedelta(days=2, hours=23), max_age)
    assert is_expired(queued, queued + timedelta(days=3), max_age)
    assert is_expired(queued, queued + timedelta(days=30), 3 * 86_400)


def test_is_expired_with_epoch_seconds() -> None:
    assert not is_expired(1000.0, 1099.0, 100)
    assert is_expired(1000.0, 1100.0, 100.0)


def test_is_expired_refuses_mixed_kinds() -> None:
    with pytest.raises(TypeError):
        is_expired(datetime.now(UTC), 5.0, 10)
