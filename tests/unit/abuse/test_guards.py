"""The guards' judgements: thresholds, the minimum sample, what the figures say."""

from __future__ import annotations

from datetime import timedelta

from postbode.abuse.guards import Thresholds, judge_bombing, judge_bounces, judge_complaints
from postbode.config import Settings

T = Thresholds()


def test_bounce_rate_needs_its_sample_and_must_be_above_the_threshold() -> None:
    assert judge_bounces(199, 100, T) is None  # too few to say anything
    assert judge_bounces(200, 20, T) is None  # exactly 10 %: not above
    trip = judge_bounces(200, 30, T)
    assert trip is not None and trip.kind == "bounce_rate"
    assert trip.figures == {
        "hard_bounces": 30,
        "deliveries": 200,
        "rate": 0.15,
        "threshold": 0.10,
        "window_minutes": 60,
    }
    assert "15.0%" in trip.reason


def test_complaint_rate_is_the_mailbox_providers_limit() -> None:
    assert judge_complaints(999, 10, T) is None
    assert judge_complaints(1000, 3, T) is None  # 0.3 %: not above
    trip = judge_complaints(1000, 4, T)
    assert trip is not None and trip.figures["rate"] == 0.004


def test_list_bombing_wants_many_unknown_and_most_of_the_domain() -> None:
    assert judge_bombing("big.test", 49, 50, T) is None
    assert judge_bombing("big.test", 60, 200, T) is None  # 30 % of the domain's deliveries
    trip = judge_bombing("big.test", 60, 100, T)
    assert trip is not None and trip.figures["domain"] == "big.test"


def test_thresholds_come_from_the_settings() -> None:
    t = Thresholds.from_settings(Settings(abuse_bounce_rate=0.05, abuse_complaint_window_hours=48))
    assert t.bounce_rate == 0.05 and t.complaint_window == timedelta(hours=48)
    assert Thresholds.from_settings(Settings()) == T
