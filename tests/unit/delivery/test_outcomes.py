"""Tests for the outcome vocabulary and the SMTP reply parser."""

from __future__ import annotations

import dataclasses

import pytest

from postbode.delivery.outcomes import Delivered, HardFail, Held, Outcome, Reply, SoftFail


def test_single_line_with_enhanced_status() -> None:
    reply = Reply.parse("451 4.7.1 greylisted\r\n")
    assert reply == Reply(451, "4.7.1", "greylisted")
    assert str(reply) == "451 4.7.1 greylisted"
    assert reply.is_transient and not reply.is_permanent and not reply.is_positive


def test_without_enhanced_status() -> None:
    reply = Reply.parse("250 OK")
    assert reply.enhanced_status is None
    assert reply.text == "OK"
    assert str(reply) == "250 OK"
    assert reply.is_positive


def test_code_only() -> None:
    assert Reply.parse("354") == Reply(354, None, "")
    assert str(Reply.parse("221\r\n")) == "221"
    assert Reply.parse("354").is_intermediate


def test_multi_line_keeps_every_line_and_strips_repeated_enhanced_code() -> None:
    raw = (
        "550-5.1.1 The email account that you tried to reach does not exist.\r\n"
        "550-5.1.1 Please try double-checking the recipient's email address.\r\n"
        "550 5.1.1 https://support.example/?p=NoSuchUser x1si\r\n"
    )
    reply = Reply.parse(raw)
    assert reply.code == 550
    assert reply.enhanced_status == "5.1.1"
    assert reply.text.splitlines() == [
        "The email account that you tried to reach does not exist.",
        "Please try double-checking the recipient's email address.",
        "https://support.example/?p=NoSuchUser x1si",
    ]
    assert str(reply).startswith("550 5.1.1 The email account")
    assert "\n" not in str(reply)
    assert reply.is_permanent


def test_enhanced_status_must_match_reply_class() -> None:
    # RFC 3463 §2: a "5.x.x" after a 250 is text, not an enhanced status.
    reply = Reply.parse("250 5.1.1 odd")
    assert reply.enhanced_status is None
    assert reply.text == "5.1.1 odd"


def test_enhanced_status_needs_three_parts_and_a_boundary() -> None:
    assert Reply.parse("451 4.7 later").enhanced_status is None
    assert Reply.parse("451 4.7.1000 x").enhanced_status is None
    assert Reply.parse("451 4.7.10").enhanced_status == "4.7.10"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "hello world",
        "25 short",
        "2500 too long code",
        "600 out of range",
        "199 out of range",
        "250text",
        "250-first\r\n251 other code",
        "250-first\r\n250-never finished",
        "250 last\r\n250 after last",
    ],
)
def test_malformed_replies_raise_value_error(raw: str) -> None:
    with pytest.raises(ValueError):
        Reply.parse(raw)


def test_from_parts_matches_parse() -> None:
    assert Reply.from_parts(451, "4.7.1 greylisted\n4.7.1 see docs") == Reply.parse(
        "451-4.7.1 greylisted\r\n451 4.7.1 see docs\r\n"
    )


def test_outcomes_are_frozen_and_closed() -> None:
    reply = Reply.parse("250 2.0.0 queued as 1234")
    outcomes: list[Outcome] = [
        Delivered(reply),
        SoftFail(None, 300.0, "timeout"),
        HardFail(Reply.parse("550 5.1.1 no such user"), "rejected"),
        Held("abuse hold"),
    ]
    for outcome in outcomes:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(outcome, dataclasses.fields(outcome)[0].name, None)
    kinds = []
    for outcome in outcomes:
        match outcome:
            case Delivered(reply=r):
                kinds.append(f"delivered {r.code}")
            case SoftFail(retry_after=after):
                kinds.append(f"soft {after}")
            case HardFail(reply=r):
                kinds.append(f"hard {r}")
            case Held(reason=why):
                kinds.append(f"held {why}")
    assert kinds == [
        "delivered 250",
        "soft 300.0",
        "hard 550 5.1.1 no such user",
        "held abuse hold",
    ]
