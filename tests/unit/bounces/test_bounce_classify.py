"""Reason classification of DSN diagnostics and synchronous SMTP replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from postbode.bounces.classify import (
    CATEGORIES,
    Classification,
    RulesError,
    classify,
    find_status,
    load_rules,
    normalize_text,
)


def test_user_unknown_reply_is_hard() -> None:
    result = classify(
        "5.1.1", 550, "550 5.1.1 <x@dest.test>: Recipient address rejected: User unknown"
    )
    assert (result.category, result.hard) == ("user_unknown", True)


def test_blocked_for_reputation_is_soft_even_when_permanent() -> None:
    result = classify(
        "5.7.1",
        550,
        "550 5.7.1 Message blocked due to the poor reputation of the sending IP 192.0.2.1",
    )
    assert result == Classification("blocked", False, result.rule)
    assert result.hard is False


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        ("4.7.0", 421, "421 4.7.0 Try again later, closing connection: rate limit exceeded"),
        ("4.7.28", 421, "421-4.7.28 Our system has detected an unusual rate of mail"),
        (None, 450, "450 Too many connections from your IP, slow down"),
        ("5.7.1", 550, "550 5.7.1 Too many messages sent; throttled"),
    ],
)
def test_rate_limits_in_4xx_and_5xx(status: str | None, code: int, text: str) -> None:
    result = classify(status, code, text)
    assert (result.category, result.hard) == ("rate_limited", False)


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        ("5.2.2", 552, "552 5.2.2 <x@dest.test>: Mailbox full"),
        ("4.2.2", 452, "452 4.2.2 The email account that you tried to reach is over quota"),
        (None, 550, "550 Requested mail action aborted: exceeded storage allocation: quota"),
    ],
)
def test_mailbox_full_is_soft(status: str | None, code: int, text: str) -> None:
    result = classify(status, code, text)
    assert (result.category, result.hard) == ("mailbox_full", False)


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        ("5.3.4", 552, "552 5.3.4 Message size exceeds fixed limit"),
        ("5.2.3", 552, "552 5.2.3 Message too large"),
        (None, 552, "552 Message size exceeds maximum permitted"),
    ],
)
def test_message_too_large(status: str | None, code: int, text: str) -> None:
    assert classify(status, code, text).category == "message_too_large"


def test_status_alone_classifies_when_the_text_says_nothing() -> None:
    assert classify("5.1.1", 550, "550 5.1.1 Requested action not taken").category == (
        "user_unknown"
    )
    assert classify("4.4.7", None, "").category == "expired"
    assert classify("5.1.10", None, "").category == "domain_invalid"


def test_status_is_read_from_the_text_when_not_given() -> None:
    assert classify(None, 550, "550 5.2.2 mailbox full").category == "mailbox_full"


def test_the_recipient_address_never_decides_the_reason() -> None:
    # A local part that spells a reason must not leak into the classification.
    result = classify(None, 550, "550 <mailboxfull@dest.test>... rejected")
    assert result.category != "mailbox_full"
    assert "mailboxfull" not in normalize_text("550 <mailboxfull@dest.test>")


def test_url_fragments_are_ignored() -> None:
    text = "550 refused. See https://help.example.test/reason/#userunknown for details"
    assert "userunknown" not in normalize_text(text)
    assert classify(None, 550, text).category != "user_unknown"


def test_unknown_fallback_is_soft() -> None:
    assert classify(None, None, "something odd happened") == Classification("unknown", False)


def test_find_status_skips_ip_addresses_and_normalises() -> None:
    assert find_status("host 10.5.2.1 said 550 5.01.001 no") == "5.1.1"
    assert find_status("192.0.2.25 does not like recipient") is None


def test_operator_rules_file_replaces_the_packaged_one(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        'hard_categories = ["user_unknown"]\n'
        "[[rule]]\n"
        'name = "local-quirk"\n'
        'category = "mailbox_full"\n'
        "text = ['NO ROOM LEFT']\n",
        encoding="utf-8",
    )
    rules = load_rules(path)
    assert classify(None, 550, "550 no room left at the inn", rules).category == "mailbox_full"
    # Only this file's rules apply: the packaged phrases are gone.
    assert classify("5.1.1", 550, "user unknown", rules).category == "unknown"


@pytest.mark.parametrize(
    "body",
    [
        "[[rule]]\nname = 'x'\ncategory = 'nonsense'\ntext = ['a']\n",
        "[[rule]]\nname = 'x'\ncategory = 'blocked'\n",
        "[[rule]]\nname = 'x'\ncategory = 'blocked'\ntext = ['(unclosed']\n",
        "hard_categories = ['bogus']\n[[rule]]\ncategory = 'blocked'\ntext = ['a']\n",
        "title = 'no rules'\n",
    ],
)
def test_malformed_rules_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(RulesError):
        load_rules(path)


def test_packaged_rules_use_only_known_categories() -> None:
    rules = load_rules(None)
    assert rules.rules
    assert {r.category for r in rules.rules} <= set(CATEGORIES)
    assert rules.hard_categories == {"user_unknown", "domain_invalid"}
