"""Bounce reason classification: ordered rules kept as data (rules.toml), first match wins."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

CATEGORIES: tuple[str, ...] = (
    "user_unknown",
    "domain_invalid",
    "mailbox_inactive",
    "mailbox_full",
    "message_too_large",
    "content_rejected",
    "blocked",
    "auth_failure",
    "rate_limited",
    "expired",
    "system_error",
    "unknown",
)

# RFC 3463 §2: class.subject.detail; detail may have up to three digits.
_STATUS_RE = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
# URL query strings and fragments are opaque tokens (they can spell anything, e.g. a
# reason name in an anchor); keep scheme, host and path, which do carry meaning.
_URL_TAIL_RE = re.compile(r"(https?://[^\s?#<>\"']*)[?#][^\s<>\"']*", re.IGNORECASE)
# Addresses are replaced before matching: a local part names a person, never a reason.
_ADDR_RE = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}"
)
_SPACE_RE = re.compile(r"\s+")


class RulesError(ValueError):
    """The rules file is malformed."""


@dataclass(frozen=True, slots=True)
class Classification:
    """The reason category of one failure and whether the address itself is bad."""

    category: str
    hard: bool
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One ordered rule: every given condition must hold."""

    name: str
    category: str
    text: re.Pattern[str] | None
    status: re.Pattern[str] | None
    reply_codes: frozenset[int]
    reply_class: frozenset[str]

    def matches(self, status: str | None, reply_code: int | None, text: str) -> bool:
        if self.status is not None and (status is None or not self.status.match(status)):
            return False
        if self.reply_codes and reply_code not in self.reply_codes:
            return False
        if self.reply_class:
            klass = status[0] if status else (str(reply_code)[0] if reply_code else None)
            if klass is not None and klass not in self.reply_class:
                return False
        return self.text is None or self.text.search(text) is not None


@dataclass(frozen=True, slots=True)
class Rules:
    """A compiled, ordered rule set."""

    rules: tuple[Rule, ...]
    hard_categories: frozenset[str]
    source: str


def _status_glob(pattern: str) -> str:
    # "5.7.*", "*.4.7", "5.1.1": a wildcard is one numeric field.
    parts = pattern.strip().split(".")
    if len(parts) not in (1, 2, 3):
        raise RulesError(f"bad status pattern {pattern!r}")
    fields = [r"\d{1,3}" if p in ("*", "x", "X") else re.escape(str(int(p))) for p in parts]
    return r"\.".join(fields) + (r"$" if len(parts) == 3 else r"\.")


def _lower_pattern(pattern: str) -> str:
    # Text is lower-cased once and matched case-sensitively: IGNORECASE makes Python's
    # alternations several times slower. Escapes (\\S, \\W, \\D …) keep their case.
    out: list[str] = []
    escaped = False
    for ch in pattern:
        out.append(ch if escaped else ch.lower())
        escaped = not escaped and ch == "\\"
    return "".join(out)


def _compile_rule(index: int, raw: dict[str, Any]) -> Rule:
    name = str(raw.get("name") or f"rule-{index}")
    category = raw.get("category")
    if category not in CATEGORIES:
        raise RulesError(f"{name}: unknown category {category!r}")
    texts = raw.get("text") or []
    statuses = raw.get("status") or []
    codes = raw.get("reply_code") or []
    klass = raw.get("class") or []
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(statuses, str):
        statuses = [statuses]
    if not (texts or statuses or codes):
        raise RulesError(f"{name}: a rule needs text, status or reply_code")
    try:
        text_re = re.compile("|".join(f"(?:{_lower_pattern(t)})" for t in texts)) if texts else None
    except re.error as exc:
        raise RulesError(f"{name}: bad regular expression: {exc}") from exc
    status_re = (
        re.compile("(?:" + "|".join(_status_glob(s) for s in statuses) + ")") if statuses else None
    )
    return Rule(
        name=name,
        category=str(category),
        text=text_re,
        status=status_re,
        reply_codes=frozenset(int(c) for c in codes),
        reply_class=frozenset(str(k) for k in klass),
    )


def parse_rules(data: dict[str, Any], source: str = "<data>") -> Rules:
    """Compile rules from already-decoded TOML data."""
    raw_rules = data.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"{source}: no [[rule]] tables")
    hard = data.get("hard_categories", ["user_unknown", "domain_invalid"])
    unknown = set(hard) - set(CATEGORIES)
    if unknown:
        raise RulesError(f"{source}: unknown hard categories {sorted(unknown)}")
    rules = tuple(_compile_rule(i, r) for i, r in enumerate(raw_rules))
    return Rules(rules=rules, hard_categories=frozenset(hard), source=source)


@lru_cache(maxsize=1)
def _default_rules() -> Rules:
    text = resources.files("postbode.bounces").joinpath("rules.toml").read_text("utf-8")
    return parse_rules(tomllib.loads(text), "postbode/bounces/rules.toml")


def load_rules(path: str | Path | None = None) -> Rules:
    """Load the operator's rules file, or the packaged one when path is None."""
    if path is None:
        return _default_rules()
    p = Path(path)
    with p.open("rb") as fh:
        return parse_rules(tomllib.load(fh), str(p))


def normalize_text(text: str) -> str:
    """Prepare text for matching: opaque URL tails and addresses out, spaces folded, lower case."""
    if "://" in text:
        text = _URL_TAIL_RE.sub(r"\1", text)
    if "@" in text:
        text = _ADDR_RE.sub("<address>", text)
    return _SPACE_RE.sub(" ", text).strip().lower()


def find_status(text: str) -> str | None:
    """The first RFC 3463 enhanced status code in text, normalised (no leading zeros)."""
    m = _STATUS_RE.search(text)
    if m is None:
        return None
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"


def classify(
    status: str | None,
    reply_code: int | None,
    text: str,
    rules: Rules | None = None,
    *,
    normalized: bool = False,
) -> Classification:
    """Classify one failure (a DSN record or a synchronous SMTP reply); never raises."""
    ruleset = rules if rules is not None else _default_rules()
    if status is not None:
        status = find_status(status)
    if status is None and text:
        status = find_status(text)
    body = text if normalized else normalize_text(text)
    for rule in ruleset.rules:
        if rule.matches(status, reply_code, body):
            return Classification(
                rule.category, rule.category in ruleset.hard_categories, rule.name
            )
    return Classification("unknown", False, None)
