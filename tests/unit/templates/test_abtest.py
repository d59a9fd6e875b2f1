"""The A/B test's statistics: the two-proportion z-test and its interval against statsmodels,
the verdict's wording and minimum sample, and the stable, weighted choice of a variant."""

from __future__ import annotations

import pytest
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from postbode.templates.abtest import MIN_SAMPLE, compare, verdict
from postbode.templates.send import AbTest, Variant


@pytest.mark.parametrize(
    ("a", "na", "b", "nb"), [(520, 2000, 430, 2000), (30, 120, 25, 130), (1, 500, 0, 400)]
)
def test_compare_matches_statsmodels(a: int, na: int, b: int, nb: int) -> None:
    c = compare(a, na, b, nb)
    _, p_value = proportions_ztest([a, b], [na, nb])
    low, high = confint_proportions_2indep(a, na, b, nb, method="wald", compare="diff")
    assert c.p_value == pytest.approx(p_value, rel=1e-9)
    assert c.difference - c.half_width == pytest.approx(low, abs=1e-12)
    assert c.difference + c.half_width == pytest.approx(high, abs=1e-12)


def test_the_verdict_names_the_winner_with_its_interval() -> None:
    out = verdict(
        [
            {"name": "A", "delivered": 2000, "opened": 430},
            {"name": "B", "delivered": 2000, "opened": 520},
        ]
    )
    assert out["decided"] and out["winner"] == "B"
    assert out["text"] == "B's open rate is higher, 95 % confidence, +4.5 points ±2.6"


def test_no_verdict_before_the_minimum_sample_or_without_a_difference() -> None:
    small = verdict(
        [
            {"name": "A", "delivered": MIN_SAMPLE - 1, "opened": 0},
            {"name": "B", "delivered": 500, "opened": 400},
        ]
    )
    assert not small["decided"] and small["text"].startswith("keep testing (n too small")
    even = verdict(
        [
            {"name": "A", "delivered": 1000, "opened": 300},
            {"name": "B", "delivered": 1000, "opened": 305},
        ]
    )
    assert not even["decided"] and even["text"].startswith("keep testing (no clear difference")


def test_a_recipient_always_gets_the_same_variant_and_weights_hold() -> None:
    test = AbTest(7, (Variant("A", 1, None, None, None), Variant("B", 3, None, None, None)))
    picks = [test.pick(f"r{i}@dest.test").name for i in range(4000)]
    assert picks == [test.pick(f"R{i}@dest.test").name for i in range(4000)]
    assert 0.70 < picks.count("B") / len(picks) < 0.80
    other = AbTest(8, test.variants)
    assert picks != [other.pick(f"r{i}@dest.test").name for i in range(4000)]
