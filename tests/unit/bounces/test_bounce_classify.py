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


# -- the order of evidence (docs/bounces.md) --------------------------------------------------


def test_the_enhanced_code_decides_and_a_phrase_refines_only_within_it() -> None:
    # X.2.2 allows no reputation block: the code wins over the phrase.
    assert classify("5.2.2", 552, "552 5.2.2 blocked using zen.spamhaus.org").category == (
        "mailbox_full"
    )
    # X.1.1 allows "disabled": the phrase refines the code.
    found = classify("5.1.1", 550, "550 5.1.1 This account has been disabled")
    assert (found.category, found.hard) == ("mailbox_inactive", False)


def test_an_other_detail_lets_any_phrase_decide() -> None:
    assert classify("5.7.0", 554, "554 5.7.0 Reject, id=123 - spam message").category == (
        "content_rejected"
    )
    assert classify(
        "5.5.0", 550, "550 Requested action not taken: mailbox unavailable"
    ).category == ("user_unknown")


def test_a_generic_phrase_yields_to_the_cause_that_follows_it() -> None:
    text = "550 <a@dest.test>: Recipient address rejected: Mailbox is full"
    assert classify(None, 550, text).category == "mailbox_full"


def test_the_basic_reply_code_and_stage_decide_when_nothing_else_does() -> None:
    assert classify(None, 553, "553 sorry", stage="rcpt").category == "user_unknown"
    assert classify(None, 552, "552 sorry", stage="data").category == "message_too_large"
    assert classify(None, 552, "552 sorry", stage="rcpt").category == "mailbox_full"
    assert classify(None, 554, "554 sorry").category == "blocked"
    assert classify(None, 421, "421 sorry").category == "system_error"


def test_unknown_only_when_nothing_applies() -> None:
    assert classify(None, None, "").category == "unknown"
    assert classify(None, 550, "550 whatever", stage="rcpt").category != "unknown"


def test_two_cause_texts_lean_to_the_cause_that_does_not_suppress() -> None:
    text = "550 The mailbox may not exist, or it may be disabled"
    assert (classify(None, 550, text).category, classify(None, 550, text).hard) == (
        "mailbox_inactive",
        False,
    )
    # ... unless the code says which.
    assert classify("5.1.1", 550, "550 5.1.1 " + text[4:]).category == "user_unknown"


def test_the_smtp_stage_moves_an_address_refusal_to_the_right_party() -> None:
    # After DATA the recipient had been accepted: a content filter's words.
    assert classify(None, 550, "550 No such user", stage="data").category == "blocked"
    # At MAIL FROM an address is the sender's.
    assert classify(None, 550, "550 Unroutable sender address", stage="mail").category == (
        "blocked"
    )
    # At RCPT it is the recipient's.
    found = classify(None, 550, "550 No such user", stage="rcpt")
    assert (found.category, found.hard) == ("user_unknown", True)


def test_multi_line_reply_codes_do_not_split_phrases() -> None:
    text = (
        "552-5.7.0 This message was blocked because its content presents a potential\n"
        "552-5.7.0 security issue."
    )
    assert classify(None, 552, text).category == "content_rejected"


def test_word_groups_expand_and_unknown_groups_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        "[words]\nbox = 'mailbox|inbox'\n[[rule]]\nname = 'full'\ncategory = 'mailbox_full'\n"
        "text = ['{box} is stuffed']\n",
        encoding="utf-8",
    )
    assert classify(None, 552, "your inbox is stuffed", load_rules(path)).category == (
        "mailbox_full"
    )
    path.write_text(
        "[[rule]]\nname = 'x'\ncategory = 'blocked'\ntext = ['{nosuch}']\n", encoding="utf-8"
    )
    with pytest.raises(RulesError):
        load_rules(path)


def test_rules_without_a_family_or_phrase_drop_just_those() -> None:
    rules = load_rules(None)
    pair = ("mailbox-full", "inbox is full")
    assert pair in rules.patterns()
    fewer = rules.without(patterns=[pair])
    assert pair not in fewer.patterns()
    assert len(fewer.patterns()) == len(rules.patterns()) - 1
    tagged = {r.name for r in rules.rules if r.families}
    assert tagged, "the corpus-only rules name their families"
    family = next(iter(next(r for r in rules.rules if r.families).families))
    assert not {r.name for r in rules.without([family]).rules} & {
        r.name for r in rules.rules if family in r.families
    }


def test_every_packaged_rule_cites_its_source() -> None:
    import tomllib
    from importlib import resources

    data = tomllib.loads(
        resources.files("postbode.bounces").joinpath("rules.toml").read_text("utf-8")
    )
    assert all(rule.get("source") for rule in data["rule"]), [
        rule["name"] for rule in data["rule"] if not rule.get("source")
    ]
