"""Bounce reason classification: an explicit order of evidence over rules kept as data."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
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

# The SMTP command a refusal answered (RFC 5321 §3.3): "rcpt" refusals are about the
# recipient, "data" refusals about the message (the recipient was accepted at RCPT).
STAGES: tuple[str, ...] = ("connect", "mail", "rcpt", "data")

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
# Reply codes inside a text ("550-5.7.1 …" on every line of a multi-line reply, RFC 5321
# §4.2.1) split phrases; the codes are read separately, so phrase matching drops them.
_REPLY_PREFIX_RE = re.compile(
    r"(?<![\w.])[245]\d\d(?:-|(?= [245]\.\d))(?: ?[245]\.\d{1,3}\.\d{1,3}\b)?"
)
# OpenSMTPD joins the lines of a multi-line reply by dropping each later line's "550-" and a
# one-digit-detail code ("5.7.1 "), so a longer code stays glued to the line before it
# ("… Gmail5.7.26 requires …"): that code goes too. (The expression starts with the code, which
# the engine finds fast; the character before it is checked only where one is found.)
_LONG_CODE_RE = re.compile(r"[245]\.\d{1,3}\.\d{2,3}(?= )")


def _unglue(m: re.Match[str]) -> str:
    text, i = m.string, m.start()
    before = text[i - 1] if i else " "
    if before.isalpha() or before in ",;:)" or (before == "." and i > 1 and text[i - 2].isalpha()):
        return " "
    return m.group(0)


# Where a rule stands in the order of evidence (see docs/bounces.md):
#   code     an RFC 3463 enhanced status code decides, text may refine within `refine`
#   text     a phrase that names one cause
#   generic  a phrase that says little ("mailbox unavailable"): only when nothing else does
#   reply    the basic RFC 5321 reply code, with the SMTP stage where known
TIERS: tuple[str, ...] = ("code", "text", "generic", "reply")


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
    """One rule: every given condition must hold."""

    name: str
    category: str
    text: re.Pattern[str] | None
    status: re.Pattern[str] | None
    reply_codes: frozenset[int]
    reply_class: frozenset[str]
    tier: str = "text"
    stages: frozenset[str] = frozenset()
    refine: frozenset[str] = frozenset()  # code tier: categories the text may choose instead
    families: frozenset[str] = frozenset()  # corpus families the rule was checked against
    patterns: tuple[str, ...] = ()  # the text alternatives as written (lower-cased)
    required: frozenset[str] | None = None  # a match contains one of these (a prefilter)

    @property
    def text_only(self) -> bool:
        """Only a text condition: matching is one regular-expression search."""
        return (
            self.text is not None
            and self.status is None
            and not self.reply_codes
            and not self.reply_class
            and not self.stages
        )

    def matches(
        self, status: str | None, reply_code: int | None, text: str, stage: str | None = None
    ) -> bool:
        if self.status is not None and (status is None or not self.status.match(status)):
            return False
        if self.reply_codes and reply_code not in self.reply_codes:
            return False
        if self.reply_class:
            klass = status[0] if status else (str(reply_code)[0] if reply_code else None)
            if klass is not None and klass not in self.reply_class:
                return False
        if self.stages and (stage or "unknown") not in self.stages:
            return False
        return self.text is None or self.text.search(text) is not None


@dataclass(frozen=True, slots=True)
class Rules:
    """A compiled rule set, split by tier (each tier keeps its file order)."""

    rules: tuple[Rule, ...]
    hard_categories: frozenset[str]
    source: str
    hedges: re.Pattern[str] | None = None
    hedge_patterns: tuple[str, ...] = ()

    def tier(self, name: str) -> tuple[Rule, ...]:
        return _tiers(self)[name]

    def patterns(self) -> list[tuple[str, str]]:
        """Every (rule name, text alternative) pair; hedges count as rule "hedges"."""
        pairs = [(r.name, p) for r in self.rules for p in r.patterns]
        return pairs + [("hedges", p) for p in self.hedge_patterns]

    def without(
        self, families: Iterable[str] = (), patterns: Iterable[tuple[str, str]] = ()
    ) -> Rules:
        """The rule set less every rule checked against one of `families` and less the
        given (rule name, text alternative) pairs: what the rules would be had those
        samples never been seen (leave-one-family-out evaluation)."""
        drop = frozenset(families)
        gone = frozenset(patterns)
        kept: list[Rule] = []
        for rule in self.rules:
            if rule.families & drop:
                continue
            left = tuple(p for p in rule.patterns if (rule.name, p) not in gone)
            if left == rule.patterns:
                kept.append(rule)
            elif left:
                kept.append(
                    replace(
                        rule,
                        text=_compile_text(rule.name, list(left)),
                        patterns=left,
                        required=_rule_required(list(left)),
                    )
                )
        hedges = tuple(p for p in self.hedge_patterns if ("hedges", p) not in gone)
        return Rules(
            tuple(kept),
            self.hard_categories,
            f"{self.source} (restricted)",
            _compile_text("hedges", list(hedges)),
            hedges,
        )


_TIER_CACHE: dict[int, tuple[Rules, dict[str, tuple[Rule, ...]]]] = {}


def _tiers(rules: Rules) -> dict[str, tuple[Rule, ...]]:
    cached = _TIER_CACHE.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1]
    split = {t: tuple(r for r in rules.rules if r.tier == t) for t in TIERS}
    if len(_TIER_CACHE) > 64:
        _TIER_CACHE.clear()
    _TIER_CACHE[id(rules)] = (rules, split)
    return split


def _status_glob(pattern: str) -> str:
    # "5.7.*", "*.4.7", "5.1.1": a wildcard is one numeric field.
    parts = pattern.strip().split(".")
    if len(parts) not in (1, 2, 3):
        raise RulesError(f"bad status pattern {pattern!r}")
    fields = []
    for p in parts:
        if p in ("*", "x", "X"):
            fields.append(r"\d{1,3}")
        elif p and all(c.isdigit() or c == "?" for c in p) and "?" in p:
            fields.append(p.replace("?", r"\d"))  # "5??": one digit per "?"
        elif p.isdigit():
            fields.append(re.escape(str(int(p))))
        else:
            raise RulesError(f"bad status pattern {pattern!r}")
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


def _strings(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key) or []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RulesError(f"{key} must be a string or a list")
    return [str(v) for v in value]


def _compile_text(name: str, texts: list[str]) -> re.Pattern[str] | None:
    if not texts:
        return None
    try:
        return re.compile("|".join(f"(?:{_lower_pattern(t)})" for t in texts))
    except re.error as exc:
        raise RulesError(f"{name}: bad regular expression: {exc}") from exc


# ------------------------------------------------------------------ the literal prefilter
# Before a rule's regular expression runs, an `in` test checks that the text holds one of
# the literal strings every match of the rule needs. They are read from the rule's own
# pattern by the small reader below, which knows the part of Python's syntax the rules use
# (literals and escapes, classes, groups, lookarounds, alternation, quantifiers) and gives
# up on anything else: a rule without literals is simply always tried.


class _NoLiterals(Exception):
    """The pattern uses syntax the literal reader does not follow."""


# An item of a parsed sequence: ("lit", char) | ("group", alternatives) | ("other", None),
# with its repeat bounds (lo, hi); hi None is unbounded.
_Item = tuple[str, Any, int, int | None]
_CLASS_ESCAPES = frozenset("sSwWdDbBAZ")
_QUANT_RE = re.compile(r"\{(\d*)(?:(,)(\d*))?\}")


def _read_alternatives(p: str, i: int, depth: int) -> tuple[list[list[_Item]], int]:
    """Parse p[i:] up to the ")" closing this depth (or the end): its alternatives."""
    alternatives: list[list[_Item]] = [[]]
    while i < len(p):
        ch = p[i]
        if ch == "|":
            alternatives.append([])
            i += 1
            continue
        if ch == ")":
            if depth == 0:
                raise _NoLiterals(p)
            return alternatives, i + 1
        kind: str
        value: Any = None
        if ch == "\\":
            if i + 1 >= len(p):
                raise _NoLiterals(p)
            nxt = p[i + 1]
            if nxt in _CLASS_ESCAPES:
                kind = "other"
            elif nxt in "nt":
                kind, value = "lit", "\n" if nxt == "n" else "\t"
            elif nxt.isalnum():
                raise _NoLiterals(p)  # backreferences, \x.., \1: not in the rules
            else:
                kind, value = "lit", nxt
            i += 2
        elif ch == "[":
            j = i + 1
            if j < len(p) and p[j] == "^":
                j += 1
            if j < len(p) and p[j] == "]":
                j += 1
            while j < len(p) and p[j] != "]":
                j += 2 if p[j] == "\\" else 1
            if j >= len(p):
                raise _NoLiterals(p)
            kind, i = "other", j + 1
        elif ch == "(":
            if p.startswith("(?:", i):
                inner, i = _read_alternatives(p, i + 3, depth + 1)
                kind, value = "group", inner
            elif p.startswith(("(?=", "(?!"), i) or p.startswith(("(?<=", "(?<!"), i):
                start = i + (4 if p[i + 2] == "<" else 3)
                _, i = _read_alternatives(p, start, depth + 1)
                kind = "other"  # an assertion: zero-width, needs nothing
            elif p.startswith("(?", i):
                raise _NoLiterals(p)  # flags, named groups, conditionals
            else:
                inner, i = _read_alternatives(p, i + 1, depth + 1)
                kind, value = "group", inner
        elif ch in ".^$":
            kind, i = "other", i + 1
        elif ch in "*+?":
            raise _NoLiterals(p)  # a quantifier with nothing before it
        else:
            kind, value, i = "lit", ch, i + 1
        lo: int = 1
        hi: int | None = 1
        quantified = True
        if i < len(p) and p[i] in "*+?":
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[p[i]]
            i += 1
        elif i < len(p) and p[i] == "{" and (m := _QUANT_RE.match(p, i)) and m.group(0) != "{}":
            lo = int(m.group(1) or 0)
            hi = None if m.group(2) and not m.group(3) else int(m.group(3) or m.group(1) or 0)
            i = m.end()
        else:
            quantified = False
        if quantified and i < len(p) and p[i] in "?+":
            i += 1  # lazy or possessive: the same bounds
        alternatives[-1].append((kind, value, lo, hi))
    if depth:
        raise _NoLiterals(p)
    return alternatives, i


def _sequence_literals(items: list[_Item]) -> frozenset[str] | None:
    """A set of strings of which every match of the sequence contains one, or None."""
    candidates: list[frozenset[str]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            candidates.append(frozenset({"".join(run)}))
            run.clear()

    for kind, value, lo, hi in items:
        if kind == "lit" and lo >= 1:
            run.append(value)
            if hi != 1:
                flush()  # more copies may follow: the run cannot go on past them
            continue
        flush()
        if kind == "group" and lo >= 1:
            sub = _alternatives_literals(value)
            if sub:
                candidates.append(sub)
    flush()
    if not candidates:
        return None
    # The most selective: the set whose shortest string is longest.
    return max(candidates, key=lambda c: (min(len(x) for x in c), -len(c)))


def _alternatives_literals(alternatives: list[list[_Item]]) -> frozenset[str] | None:
    found: set[str] = set()
    for items in alternatives:
        sub = _sequence_literals(items)
        if sub is None:
            return None
        found |= sub
    return frozenset(found)


def required_literals(pattern: str) -> frozenset[str] | None:
    """Literal strings of which every match of `pattern` contains one (None: no such set
    found). A cheap `in` test on them skips most rules before their regular expression."""
    try:
        alternatives, _ = _read_alternatives(pattern, 0, 0)
    except (_NoLiterals, RecursionError):
        return None
    found = _alternatives_literals(alternatives)
    if not found or min(len(x) for x in found) < 2:
        return None
    return _shortest(found)


def _shortest(literals: frozenset[str]) -> frozenset[str]:
    """The set less every string that contains another of the set: a text that holds the
    longer one holds the shorter, so the shorter alone is as good a test and a cheaper one."""
    kept: list[str] = []
    for lit in sorted(literals, key=len):
        if not any(k in lit for k in kept):
            kept.append(lit)
    return frozenset(kept)


_WORD_REF_RE = re.compile(r"\{([a-z_]+)\}")


def _expand(name: str, pattern: str, words: dict[str, str]) -> str:
    """Replace {group} by the [words] table's alternatives (regex quantifiers like {0,4}
    have digits and are left alone)."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in words:
            raise RulesError(f"{name}: unknown word group {{{m.group(1)}}}")
        return f"(?:{words[m.group(1)]})"

    return _WORD_REF_RE.sub(one, pattern)


def _compile_rule(index: int, raw: dict[str, Any], words: dict[str, str] | None = None) -> Rule:
    name = str(raw.get("name") or f"rule-{index}")
    category = raw.get("category")
    if category not in CATEGORIES:
        raise RulesError(f"{name}: unknown category {category!r}")
    texts = [_expand(name, t, words or {}) for t in _strings(raw, "text")]
    statuses = _strings(raw, "status")
    codes = raw.get("reply_code") or []
    klass = _strings(raw, "class")
    stages = _strings(raw, "stage")
    refine = _strings(raw, "refine")
    if not (texts or statuses or codes):
        raise RulesError(f"{name}: a rule needs text, status or reply_code")
    if bad := set(stages) - set(STAGES) - {"unknown"}:
        raise RulesError(f"{name}: unknown stage {sorted(bad)}")
    if "*" in refine:
        refine = list(CATEGORIES)
    if bad := set(refine) - set(CATEGORIES):
        raise RulesError(f"{name}: unknown category in refine {sorted(bad)}")
    tier = raw.get("tier")
    if tier is None:
        if statuses and not texts:
            tier = "code"
        elif codes and not statuses:
            tier = "reply"
        else:
            tier = "text"
    if tier not in TIERS:
        raise RulesError(f"{name}: unknown tier {tier!r}")
    status_re = (
        re.compile("(?:" + "|".join(_status_glob(s) for s in statuses) + ")") if statuses else None
    )
    return Rule(
        name=name,
        category=str(category),
        text=_compile_text(name, texts),
        status=status_re,
        reply_codes=frozenset(int(c) for c in codes),
        reply_class=frozenset(klass),
        tier=str(tier),
        stages=frozenset(stages),
        refine=frozenset(refine),
        families=frozenset(_strings(raw, "families")),
        patterns=tuple(texts),
        required=_rule_required(texts),
    )


def _rule_required(texts: list[str]) -> frozenset[str] | None:
    if not texts:
        return None
    parts = [required_literals(_lower_pattern(t)) for t in texts]
    if any(p is None for p in parts):
        return None
    return _shortest(frozenset().union(*(p for p in parts if p is not None)))


def parse_rules(data: dict[str, Any], source: str = "<data>") -> Rules:
    """Compile rules from already-decoded TOML data."""
    raw_rules = data.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"{source}: no [[rule]] tables")
    hard = data.get("hard_categories", ["user_unknown", "domain_invalid"])
    unknown = set(hard) - set(CATEGORIES)
    if unknown:
        raise RulesError(f"{source}: unknown hard categories {sorted(unknown)}")
    words = data.get("words", {})
    if not isinstance(words, dict) or not all(isinstance(v, str) for v in words.values()):
        raise RulesError(f"{source}: [words] must map names to regular expressions")
    rules = tuple(_compile_rule(i, r, words) for i, r in enumerate(raw_rules))
    hedge_list = [_expand("hedges", h, words) for h in _strings(data, "hedges")]
    compiled = Rules(
        rules=rules,
        hard_categories=frozenset(hard),
        source=source,
        hedges=_compile_text("hedges", hedge_list),
        hedge_patterns=tuple(hedge_list),
    )
    _derived(compiled)  # compile each rule's alternatives now, not at the first bounce
    return compiled


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
        # "<@>", not a word: a placeholder such as "<address>" would itself match phrases
        # about addresses.
        text = _ADDR_RE.sub("<@>", text)
    if "-" in text or "." in text:
        text = _REPLY_PREFIX_RE.sub(" ", text)
        if "." in text:
            text = _LONG_CODE_RE.sub(_unglue, text)
    return _SPACE_RE.sub(" ", text).strip().lower()


def rule_tier(name: str | None, rules: Rules | None = None) -> str | None:
    """The tier of the rule called `name` ("code", "text", "generic", "reply"), if any."""
    if name is None:
        return None
    ruleset = rules if rules is not None else _default_rules()
    return _by_name(ruleset).get(name)


# A text-only rule's alternatives, each with the literals it needs: an alternative whose
# literals are absent is not searched (one search of the whole alternation tries every
# alternative at every position of the text).
_Parts = dict[str, tuple[tuple[frozenset[str] | None, re.Pattern[str]], ...]]
_DERIVED: dict[int, tuple[Rules, dict[str, str], _Parts]] = {}


def _derived(rules: Rules) -> tuple[dict[str, str], _Parts]:
    cached = _DERIVED.get(id(rules))
    if cached is None or cached[0] is not rules:
        if len(_DERIVED) > 64:
            _DERIVED.clear()
        tiers = {r.name: r.tier for r in rules.rules}
        parts: _Parts = {}
        for r in rules.rules:
            if r.text_only:
                lowered = [_lower_pattern(t) for t in r.patterns]
                parts[r.name] = tuple((required_literals(t), re.compile(t)) for t in lowered)
        cached = _DERIVED[id(rules)] = (rules, tiers, parts)
    return cached[1], cached[2]


def _by_name(rules: Rules) -> dict[str, str]:
    return _derived(rules)[0]


def _text_parts(rules: Rules) -> _Parts:
    return _derived(rules)[1]


def find_status(text: str) -> str | None:
    """The first RFC 3463 enhanced status code in text, normalised (no leading zeros)."""
    m = _STATUS_RE.search(text)
    if m is None:
        return None
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"


def find_statuses(text: str) -> list[str]:
    """Every RFC 3463 enhanced status code in text, in order, normalised."""
    return [f"{a}.{int(b)}.{int(c)}" for a, b, c in _STATUS_RE.findall(text)]


def _pick(
    candidates: Iterable[Rule],
    allowed: frozenset[str] | None,
    hedged: Callable[[], bool],
    hard: frozenset[str],
    match: Callable[[Rule], bool],
) -> Rule | None:
    """The first candidate in `allowed` whose conditions hold (tested lazily, in order)."""
    first: Rule | None = None
    for rule in candidates:
        if allowed is not None and rule.category not in allowed:
            continue
        if first is not None and rule.category in hard:
            continue
        if not match(rule):
            continue
        if rule.category not in hard or not hedged():
            return rule
        # A text that names two causes ("may not exist or may be disabled") proves
        # neither: look on for the cause that does not suppress the address, since a
        # wrong hard call stops mail to a good address for good.
        first = first or rule
    return first


def classify(
    status: str | None,
    reply_code: int | None,
    text: str,
    rules: Rules | None = None,
    *,
    normalized: bool = False,
    stage: str | None = None,
) -> Classification:
    """Classify one failure (a DSN record or a synchronous SMTP reply); never raises.

    The order of evidence (docs/bounces.md): the enhanced status code's class.subject.detail
    (RFC 3463) decides, and a phrase may only refine it to a category the code allows; with
    no code (or a bare X.0.0) a phrase naming one cause decides; then a generic phrase; then
    the basic reply code (RFC 5321 §4.2.2) with the SMTP stage; `unknown` only when nothing
    applies. `stage` is the command the refusal answered ("rcpt", "data", …) when known.
    """
    ruleset = rules if rules is not None else _default_rules()
    if status is not None:
        status = find_status(status)
    if status is None and text:
        status = find_status(text)
    body = text if normalized else normalize_text(text)
    # Bounces repeat: one provider's reply for many recipients, the same after addresses are
    # taken out. The result depends on these four values and the rules only.
    memo = _memo(ruleset)
    key = (status, reply_code, body, stage)
    found = memo.get(key)
    if found is None:
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        found = memo[key] = _classify(status, reply_code, body, ruleset, stage)
    return found


MEMO_SIZE = 4096
_MEMOS: dict[
    int, tuple[Rules, dict[tuple[str | None, int | None, str, str | None], Classification]]
] = {}


def _memo(rules: Rules) -> dict[tuple[str | None, int | None, str, str | None], Classification]:
    cached = _MEMOS.get(id(rules))
    if cached is None or cached[0] is not rules:
        if len(_MEMOS) > 64:
            _MEMOS.clear()
        cached = _MEMOS[id(rules)] = (rules, {})
    return cached[1]


def clear_memo() -> None:
    """Forget remembered classifications (benchmarks measure the work itself)."""
    _MEMOS.clear()


def _classify(
    status: str | None, reply_code: int | None, body: str, ruleset: Rules, stage: str | None
) -> Classification:
    hard = ruleset.hard_categories
    seen: list[bool] = []

    def hedged() -> bool:  # asked only when a hard cause is about to win
        if not seen:
            seen.append(ruleset.hedges is not None and ruleset.hedges.search(body) is not None)
        return seen[0]

    def done(rule: Rule | None, category: str | None = None) -> Classification:
        if rule is None:
            return Classification("unknown", False, None)
        cat = category or rule.category
        return Classification(cat, cat in hard, rule.name)

    text_parts = _text_parts(ruleset)

    def match(rule: Rule) -> bool:
        if rule.required is not None:
            for lit in rule.required:
                if lit in body:
                    break
            else:
                return False
        parts = text_parts.get(rule.name)
        if parts is None:
            return rule.matches(status, reply_code, body, stage)
        for literals, pattern in parts:
            if literals is not None:
                for lit in literals:
                    if lit in body:
                        break
                else:
                    continue
            if pattern.search(body) is not None:
                return True
        return False

    texts = ruleset.tier("text")
    code_rule = None
    if status is not None and not status.endswith(".0.0"):
        code_rule = next((r for r in ruleset.tier("code") if match(r)), None)
    if code_rule is not None:
        allowed = code_rule.refine | {code_rule.category}
        if hedged() and any(match(r) for r in texts if r.category == code_rule.category):
            # Two causes named, one of them the code's: the code decides between them.
            allowed = frozenset({code_rule.category})
        found = _pick(texts, allowed, hedged, hard, match)
        if found is None and (status or "").endswith(".0"):
            # An "other" detail (X.Y.0): the code names the subject only; a generic
            # phrase may still say more than it (a specific detail says more than one).
            found = _pick(ruleset.tier("generic"), allowed, hedged, hard, match)
        return _after_data(done(found or code_rule), status, stage, hard)
    found = _pick(texts, None, hedged, hard, match)
    if found is None:
        found = _pick(ruleset.tier("generic"), None, hedged, hard, match)
    if found is None:
        found = next((r for r in ruleset.tier("reply") if match(r)), None)
    return _after_data(done(found), status, stage, hard)


def _after_data(
    found: Classification, status: str | None, stage: str | None, hard: frozenset[str]
) -> Classification:
    if found.category in ("user_unknown", "domain_invalid") and stage == "mail":
        # RFC 5321 §3.3: MAIL FROM names the sender; an address refused there is ours.
        return Classification("blocked", "blocked" in hard, "address-refused-at-mail-from")
    if (
        stage == "data"
        and found.category in ("user_unknown", "domain_invalid")
        and (status or "")[1:4] != ".1."
    ):
        # The server took RCPT TO and refused only after DATA, without an addressing code
        # (RFC 3463 §3.2, X.1.*): the mailbox exists (RFC 5321 §3.3, recipients are
        # verified at RCPT), so a content filter answered "user unknown" (or spoke of
        # another address, such as the sender's).
        return Classification("blocked", "blocked" in hard, "user-unknown-after-data")
    return found
