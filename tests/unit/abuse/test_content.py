"""Reading rspamd's /checkv2 answer and judging a score: pure functions, and the settings check."""

from __future__ import annotations

import pytest

from postbode.abuse.content import (
    HOLD_PREFIX,
    ContentScanner,
    Thresholds,
    hold_text,
    judge,
    parse_verdict,
    refuse_text,
)
from postbode.config import Settings
from postbode.preflight import BadSetting, check

# An answer of rspamd 3.4 to a message between the hold and reject scores (abridged).
ANSWER = {
    "is_skipped": False,
    "score": 8.4,
    "required_score": 15.0,
    "action": "add header",
    "symbols": {
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "options": ["text/plain"]},
        "POSTBODE_TEST_MIDDLE": {
            "name": "POSTBODE_TEST_MIDDLE",
            "score": 8.5,
            "options": ["Order middle-score-marker"],
        },
        "ARC_NA": {"name": "ARC_NA", "score": 0.0},
    },
    "message-id": "x1@shop.test",
}


def test_a_verdict_keeps_score_action_and_symbols_highest_first() -> None:
    verdict = parse_verdict(ANSWER)
    assert (verdict.score, verdict.action) == (8.4, "add header")
    assert [s.name for s in verdict.symbols] == ["POSTBODE_TEST_MIDDLE", "ARC_NA", "MIME_GOOD"]
    assert verdict.symbols_json()[0] == {
        "name": "POSTBODE_TEST_MIDDLE",
        "score": 8.5,
        "options": ["Order middle-score-marker"],
    }


def test_hostile_answers_are_bounded_or_refused() -> None:
    with pytest.raises(ValueError):
        parse_verdict({"action": "reject"})
    with pytest.raises(ValueError):
        parse_verdict(["not", "an", "object"])
    verdict = parse_verdict(
        {
            "score": "nan",
            "symbols": {f"S{i}": {"score": i, "options": ["x" * 5000] * 50} for i in range(200)}
            | {"BAD\r\n550 NAME": {"score": 1}, "": {"score": 2}, "N": "not a dict"},
        }
    )
    assert verdict.score == 0.0
    assert len(verdict.symbols) == 60 and verdict.symbols[0].name == "S199"
    assert all(
        len(s.options) <= 8 and all(len(o) <= 200 for o in s.options) for s in verdict.symbols
    )
    names = {
        s.name for s in parse_verdict({"score": 1, "symbols": {"BAD\r\n550 NAME": {}}}).symbols
    }
    assert names == {"BAD550NAME"}


@pytest.mark.parametrize(
    ("score", "decision"),
    [
        (-1.0, "pass"),
        (5.99, "pass"),
        (6.0, "hold"),
        (14.99, "hold"),
        (15.0, "refuse"),
        (99, "refuse"),
    ],
)
def test_judge_holds_at_and_refuses_at_the_thresholds(score: float, decision: str) -> None:
    assert judge(score, Thresholds(6.0, 15.0)) == decision


def test_reasons_name_the_symbols_that_scored_but_not_what_they_matched() -> None:
    verdict = parse_verdict(ANSWER)
    text = hold_text(verdict, Thresholds())
    assert text == f"{HOLD_PREFIX} 8.4 (hold at 6): POSTBODE_TEST_MIDDLE 8.5"
    gtube = parse_verdict({"score": 15, "action": "reject", "symbols": {"GTUBE": {"score": 0}}})
    said = refuse_text(gtube, Thresholds())
    assert said == "message refused for its content: score 15 (refused at 15): GTUBE 0"
    assert "middle-score-marker" not in text  # options quote the message: not in replies


def test_no_url_means_no_scanner_and_bad_settings_stop_the_start() -> None:
    assert ContentScanner.from_settings(Settings()) is None
    assert ContentScanner.from_settings(Settings(rspamd_url="")) is None
    scanner = ContentScanner.from_settings(Settings(rspamd_url="http://127.0.0.1:11333/"))
    assert scanner is not None and scanner.url == "http://127.0.0.1:11333/checkv2"
    with pytest.raises(BadSetting, match="POSTBODE_RSPAMD_URL"):
        check(Settings(rspamd_url="127.0.0.1:11333"))
    with pytest.raises(BadSetting, match="POSTBODE_RSPAMD_REJECT_SCORE"):
        check(Settings(rspamd_hold_score=10, rspamd_reject_score=10))
