"""Bounce parsing: DSNs (RFC 3464), ARF (RFC 5965), auto-replies (RFC 3834) and vendor formats."""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import json
import quopri
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from postbode.bounces.classify import (
    Classification,
    Rules,
    classify,
    find_status,
    required_literals,
    rule_tier,
)

# Hostile-input bounds: what a bounce needs to say sits at the top (RFC 3464 §2: the
# human-readable part and the delivery-status part precede the returned message), so a
# 20 MB bounce is parsed from its first MAX_INPUT bytes only.
MAX_INPUT = 1_000_000
MAX_DEPTH = 8
MAX_PARTS = 64
MAX_PART_TEXT = 200_000
MAX_REPORT_TEXT = 24_000
MAX_RECORDS = 100
MAX_DIAGNOSTIC = 1_000
MAX_CONTEXT = 3_000
MAX_STAGE_CONTEXT = 1_200

KINDS = ("bounce", "complaint", "auto_reply", "delivered", "not_bounce")


@dataclass(frozen=True, slots=True)
class BounceRecord:
    """One failed (or, in a success DSN, delivered) recipient."""

    recipient: str | None
    status: str | None
    reply_code: int | None
    diagnostic: str
    category: str
    hard: bool
    remote_mta: str | None = None
    action: str | None = None


@dataclass(frozen=True, slots=True)
class BounceReport:
    """What a raw message turned out to be, and what it says about which recipients."""

    kind: str
    records: tuple[BounceRecord, ...] = ()
    original_message_id: str | None = None
    feedback_type: str | None = None
    reporting_mta: str | None = None

    @property
    def is_bounce(self) -> bool:
        return self.kind == "bounce"

    @property
    def primary(self) -> BounceRecord | None:
        return self.records[0] if self.records else None


NOT_BOUNCE = BounceReport(kind="not_bounce")


# ------------------------------------------------------------------------------ MIME model
@dataclass(slots=True)
class _Part:
    ctype: str
    headers: dict[str, str]
    text: str
    depth: int


@dataclass(slots=True)
class _Message:
    headers: dict[str, str]
    parts: list[_Part] = field(default_factory=list)


_NEWLINES_RE = re.compile(r"\r\n?")
_PARAM_RE = re.compile(r';\s*([\w.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_GUESS_BOUNDARY_RE = re.compile(r"(?m)^--([^\s-][^\s]{5,69})[ \t]*$")
_ENCODED_WORD_RE = re.compile(r"=\?([\w.:-]+)(?:\*[\w-]+)?\?([bBqQ])\?([^?]*)\?=")


# One header field with its folded continuation lines (RFC 5322 §2.2.3): a line that does
# not start with white space and has a ":", then every line that does start with it.
_FIELD_RE = re.compile(r"^([^ \t\n:][^:\n]*):([^\n]*(?:\n[ \t][^\n]*)*)", re.MULTILINE)


def _split_head(text: str) -> tuple[dict[str, str], str]:
    """Split a header block from its body; RFC 5322 §2.2.3 unfolding; first value wins."""
    if text.startswith("\n"):
        return {}, text[1:]
    end = text.find("\n\n")
    block, body = (text, "") if end < 0 else (text[:end], text[end + 2 :])
    headers: dict[str, str] = {}
    for name, value in _FIELD_RE.findall(block):
        name = name.strip().lower()
        if not name or " " in name or len(name) > 76 or name in headers:
            continue  # not a field name, or a repeated field: the first value wins
        if "\n" in value:
            first, *folded = value.split("\n")
            headers[name] = first.strip() + "".join(" " + line.strip() for line in folded)
        else:
            headers[name] = value.strip()
    return headers, body


def _content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "text/plain", {}
    ctype = value.split(";", 1)[0].strip().lower() or "text/plain"
    params = {m.group(1).lower(): m.group(2).strip('"') for m in _PARAM_RE.finditer(value)}
    return ctype, params


def _to_bytes(text: str) -> bytes:
    return text.encode("latin-1", "replace")


@functools.lru_cache(maxsize=256)
def _known_charset(charset: str) -> bool:
    # The codec registry remembers the codecs it found, not the names it did not: an unknown
    # charset would search every encodings module again for each part that names it.
    try:
        codecs.lookup(charset)
    except LookupError:
        return False
    return True


def _decode_charset(data: bytes, charset: str | None) -> str:
    if charset and not _known_charset(charset):
        charset = None
    if charset:
        return data.decode(charset, "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_body(text: str, cte: str, charset: str | None) -> str:
    cte = cte.strip().lower()
    if cte == "base64":
        try:
            data = base64.b64decode(_to_bytes(text), validate=False)
        except (binascii.Error, ValueError):
            data = _to_bytes(text)
    elif cte == "quoted-printable":
        data = quopri.decodestring(_to_bytes(text))
    elif text.isascii():
        return text
    else:
        data = _to_bytes(text)
    return _decode_charset(data, charset)


def decode_header(value: str) -> str:
    """RFC 2047 encoded-words to text; tolerant of junk."""
    if "=?" not in value:
        return value

    def one(m: re.Match[str]) -> str:
        charset, enc, payload = m.group(1), m.group(2).lower(), m.group(3)
        try:
            if enc == "b":
                data = base64.b64decode(payload + "=" * (-len(payload) % 4))
            else:
                data = quopri.decodestring(payload.replace("_", " ").encode("latin-1"), header=True)
            return _decode_charset(data, charset)
        except (binascii.Error, ValueError, UnicodeError):
            return m.group(0)

    return _ENCODED_WORD_RE.sub(one, value)


def _walk(headers: dict[str, str], body: str, depth: int, out: list[_Part]) -> None:
    ctype, params = _content_type(headers.get("content-type"))
    if ctype.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = params.get("boundary", "")
        chunks = ("\n" + body).split("\n--" + boundary) if boundary else []
        if len(chunks) < 2:
            # RFC 2046 §5.1.1 says the boundary must match; broken generators (and
            # anonymisers) change one side, so fall back to the first delimiter-like line.
            m = _GUESS_BOUNDARY_RE.search(body[:MAX_PART_TEXT])
            chunks = ("\n" + body).split("\n--" + m.group(1)) if m else []
        if len(chunks) < 2:
            # No parts at all: read the body as the text it probably is.
            ctype, headers = "text/plain", {}
        for chunk in chunks[1:]:
            if len(out) >= MAX_PARTS or chunk.startswith("--"):
                break
            nl = chunk.find("\n")
            if nl < 0:
                continue
            sub_headers, sub_body = _split_head(chunk[nl + 1 :])
            _walk(sub_headers, sub_body, depth + 1, out)
        if len(chunks) >= 2:
            return
    if len(out) >= MAX_PARTS:
        return
    cte = headers.get("content-transfer-encoding", "")
    text = _decode_body(body[:MAX_PART_TEXT], cte, params.get("charset"))
    out.append(_Part(ctype, headers, text, depth))


def _load(raw: bytes) -> _Message:
    # latin-1 maps bytes 1:1, so 8-bit bodies survive until their charset is known.
    text = _NEWLINES_RE.sub("\n", raw[:MAX_INPUT].decode("latin-1"))
    headers, body = _split_head(text)
    msg = _Message(headers)
    _walk(headers, body, 0, msg.parts)
    return msg


# ------------------------------------------------------------------------------ helpers
# RFC 5321 §4.5.3.1: local part ≤ 64 octets, labels ≤ 63; the bounds also keep the scan
# linear on hostile input (an unbounded run before "@" backtracks quadratically).
_ADDR_RE = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])[\w.!#$%&'*+/=?^`{|}~-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}",
    re.ASCII,
)
_MSGID_RE = re.compile(r"(?im)^message-id:[ \t]*\n?[ \t]*(<[^>\s]+>)")
_REPLY_CODE_RE = re.compile(r"(?<![\w./-])([245][0-5]\d)(?=[ \-:,]|$)", re.MULTILINE)
_LOCAL_DAEMON_RE = re.compile(
    r"^(?:mailer-daemon|mail-daemon|postmaster|maildaemon|mail\.delivery\.system|"
    r"mdaemon|mmsc|sysadmin|no-reply|noreply|bounce|bounces|mail-?delivery|"
    r"double-bounce|nobody|root|system|administrator|owner-[\w.-]+|[\w.-]+-(?:admin|owner))\b",
    re.IGNORECASE,
)
_DAEMON_NAME_RE = re.compile(
    r"mailer[- ]daemon|mail delivery|delivery (?:status|subsystem|system)|postmaster|"
    r"mail administrator|ndr administrator|system administrator|interscan|notification",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|undelivered|"
    r"delivery (?:status notification|failure|failed|report|problem|has failed|notification)|"
    r"returned (?:mail|to sender)|return(?:ed)? mail|mail delivery failed|failure notice|"
    r"delivery status|non[- ]?delivery|could not be delivered|not (?:be )?delivered|"
    r"mail (?:system )?error|warning: (?:could not send|message .* delayed)|delayed mail|"
    r"delivery delayed|mail failure|failed mail|message delivery has failed|"
    r"permanent (?:delivery )?failure|error sending|there was an error|"
    r"loop alert|loop detected|postmaster notify|delivery notification|^mail$|"
    r"^fail(?:ed|ure)\b|\bbounced?\b",
    re.IGNORECASE,
)
_AUTOREPLY_SUBJECT_RE = re.compile(
    r"^(?:auto(?:matic)?[ -]?(?:reply|response|antwort|answer)|auto:|autoreply|"
    r"out of (?:the )?office|abwesenheit|absence|away\b|on vacation|vacation|"
    r"r[ée]ponse automatique|respuesta autom[aá]tica|risposta automatica|i am (?:out|away))|"
    r"\b(?:out of (?:the )?office|auto[- ]?reply|automatic reply|autoresponse|vacation reply)\b",
    re.IGNORECASE,
)
_AUTOREPLY_BODY_RE = re.compile(
    r"\b(?:out of (?:the )?office|i am (?:currently )?(?:away|out|on (?:vacation|leave|holiday))|"
    r"(?:on|during) (?:my )?(?:vacation|holiday|leave)|limited access to (?:e-?mail|my e-?mail)|"
    r"will (?:be )?(?:back|return|respond)|upon my return|returning to the office|"
    r"will be traveling|auto(?:matic)?[- ]?reply)\b",
    re.IGNORECASE,
)
# Where the returned copy of the original message starts in a plain-text bounce: a line that
# starts with one of these (lower case; `_original_mark` finds the first).
_ORIGINAL_MARK = (
    r"[ \t\-=*>#|_]*(?:"
    r"-+ ?original message|original message follows|original message:|original mail as follows|"
    r"original (?:message|mail) (?:headers? )?(?:is |are )?(?:following|below|attached)|"
    r"the original message (?:headers? )?(?:was|is|are)? ?(?:included|attached|as follows)|"
    r"(?:-+ )?below this line is a copy|(?:-+ )?this is a copy of (?:the|your) message|"
    r"(?:-+ )?enclosed is a copy|message headers follow|the header of the original message|"
    r"included is a copy of the message|(?:-+ )?unsent message follows|"
    r"-+ ?returned message|-+ ?original mail info|below is a copy of the original message|"
    r"-+ ?original message follows|\*\*\* ?original message|original message header|"
    r"your message reads|the text of your message|headers of the original message|"
    r"-+ ?message text|-+ ?the header of the original"
    r")"
)
# The text lower-cased once and matched without IGNORECASE, from the start and then after each
# newline (a literal the engine finds fast): a third of the work of one case-blind search
# for "^…" in multi-line mode. Lower-casing keeps offsets but for a few characters ("İ").
_ORIGINAL_MARK_AT_START = re.compile(_ORIGINAL_MARK)
_ORIGINAL_MARK_AFTER_NEWLINE = re.compile("\n" + _ORIGINAL_MARK)
_ORIGINAL_MARK_ANY_CASE = re.compile("(?im)^" + _ORIGINAL_MARK)


def _original_mark(text: str) -> int | None:
    """Where the first line that introduces the returned original starts, if any."""
    low = text.lower()
    if len(low) != len(text):
        m = _ORIGINAL_MARK_ANY_CASE.search(text)
        return m.start() if m else None
    if _ORIGINAL_MARK_AT_START.match(low):
        return 0
    m = _ORIGINAL_MARK_AFTER_NEWLINE.search(low)
    return m.start() + 1 if m else None


_HEADER_START_RE = re.compile(
    r"(?m)^(?:Received: (?:from|by)|Return-Path:|DKIM-Signature:|ARC-Seal:|X-Received:|"
    r"Delivered-To:|Authentication-Results:)"
)


def _addr_list(value: str) -> list[str]:
    return [a.lower() for a in _ADDR_RE.findall(value)]


def _clean_addr(value: str) -> str | None:
    m = _ADDR_RE.search(value)
    return m.group(0).lower().rstrip(".") if m else None


_SPACES_RE = re.compile(r"\s+")
# The SMTP command a quoted reply answered (RFC 5321 §3.3): Postfix "(in reply to RCPT TO
# command)", Exim "SMTP error from remote mail server after RCPT TO:<a>", sendmail's
# ">>> RCPT To:<a>" / "<<< 550 …" transcript, qmail "… does not like recipient".
_STAGE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "data",
        re.compile(
            r"(?i)in reply to (?:end of )?data\b|after (?:end of )?data\b|"
            r"smtp command\W+(?:end of )?data\b|did not like our (?:final )?data|"
            r">>> ?(?:data|\.)\s*\n\s*<<< ?[45]|failed after i sent the message|"
            r"remote host said: [45]\d\d[^\n]{0,200}\n?[^\n]{0,40}\bdata\b"
        ),
    ),
    (
        "rcpt",
        re.compile(
            r"(?i)in reply to rcpt to\b|after rcpt to\b|smtp command\W+rcpt\b|"
            r">>> ?rcpt to:[^\n]*\n\s*<<< ?[45]|does not like recipient|"
            r"error (?:in|at|after) rcpt\b|rcpt to:<[^>\n]*>[^\n]*\n?\s*<<<|"
            r"(?:in:|>>>)\s*rcpt to:[^\n]*\n\s*(?:out:|<<<)\s*[45]|"
            r"most progress was rcpt to|"
            # Postfix smtpd(8) names the restriction's stage in its reply text.
            r"recipient address rejected"
        ),
    ),
    (
        "mail",
        re.compile(
            r"(?i)in reply to mail from\b|after mail from\b|smtp command\W+mail\b|"
            r">>> ?mail from:[^\n]*\n\s*<<< ?[45]|does not like sender"
        ),
    ),
    (
        "connect",
        re.compile(
            r"(?i)refused to talk to me|after initial connection|in reply to (?:the )?initial "
            r"greeting|smtp greeting|banner|"
            # a greeting that turns into a refusal: "220-mx.example 421 4.2.1 …" (RFC 5321 §4.3.1)
            r"(?:^|\s)220[ -]\S+\s+[45]\d\d[ -]"
        ),
    ),
)


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a regular expression."""
    out, depth, start, escaped, in_class = [], 0, 0, False, False
    for n, ch in enumerate(pattern):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            out.append(pattern[start:n])
            start = n + 1
    out.append(pattern[start:])
    return out


# One small expression per alternative, most starting with a literal, which the regular
# expression engine finds fast, each with the literals it needs (an `in` test is cheaper
# still); the earliest mention of any stage wins.
def _stage_alternative(stage: str, alt: str) -> tuple[str, re.Pattern[str], frozenset[str]]:
    literals = required_literals(alt)
    if literals is None:  # every alternative starts with or holds a phrase
        raise ValueError(f"stage pattern without literals: {alt!r}")
    return stage, re.compile(alt), literals


_STAGE_ALTERNATIVES: tuple[tuple[str, re.Pattern[str], frozenset[str]], ...] = tuple(
    _stage_alternative(stage, alt)
    for stage, p in _STAGE_PATTERNS
    for alt in _alternatives(p.pattern.removeprefix("(?i)"))
)
# Every stage pattern above contains one of these: most texts are ruled out by `in` tests.
_STAGE_WORDS = (
    "in reply to",
    "after ",
    "smtp command",
    "did not like",
    ">>>",
    "failed after",
    "remote host said",
    "does not like",
    "rcpt",
    "recipient address rejected",
    "refused to talk",
    "greeting",
    "banner",
    "220",
)


def smtp_stage(text: str) -> str | None:
    """The SMTP command a failure answered, when the report says ("rcpt", "data", …)."""
    low = text.lower()
    for word in _STAGE_WORDS:
        if word in low:
            break
    else:
        return None
    best: tuple[int, int, str] | None = None
    for order, (stage, pattern, literals) in enumerate(_STAGE_ALTERNATIVES):
        for lit in literals:
            if lit in low:
                break
        else:
            continue
        m = pattern.search(low)
        if m is not None and (best is None or (m.start(), order) < best[:2]):
            best = (m.start(), order, stage)
    return best[2] if best else None


# A reply code quoted inside a wrapper: "5.3.0 - Other mail system problem 550-'Unknown
# user'", "smtp; 550 5.1.1 …", "Remote Server returned '550 5.1.1 …'".
_QUOTED_REPLY_RE = re.compile(r"(?<![\w.])([45][0-5]\d)(?:[ -]|$)\W{0,2}([45]\.\d{1,3}\.\d{1,3})?")


def remote_status(diagnostic: str) -> tuple[str | None, int | None]:
    """The remote server's own enhanced status and reply code in a diagnostic, preferring a
    reply quoted after a relay's wrapper code over the wrapper (the relay only passes on
    what the remote server said)."""
    first: tuple[int, int] | None = None
    for m in _QUOTED_REPLY_RE.finditer(diagnostic, 0, MAX_DIAGNOSTIC * 4):
        if m.group(2):
            # The first reply with its own enhanced code is the remote server's (a relay's
            # wrapper code stands alone; later replies in a transcript answer later commands).
            return find_status(m.group(2)), int(m.group(1))
        if first is None:
            first = (m.start(), int(m.group(1)))
    wrapper = _STATUS_POS_RE.search(diagnostic)
    if first is None:
        return (find_status(wrapper.group(0)) if wrapper else None), _first_reply_code(diagnostic)
    pos, code = first
    if wrapper is None:
        return None, code
    status = find_status(wrapper.group(0))
    if wrapper.start() < pos and status is not None and status.endswith(".0"):
        # A generic wrapper code (X.Y.0) before a quoted reply without one: the remote's
        # reply code and text speak, not the relay's catch-all.
        return None, code
    return status, code


# A notice line that gives one recipient its reply: "a@b: 550 …" (OpenSMTPD's report).
_NOTICE_LINE_RE = re.compile(r"[ \t]*<?[^\s<>@:]{1,64}@[^\s<>:]{1,255}>?:[ \t]*[45]\d\d(?:[ -]|$)")
# RFC 5321 §4.3.2: the replies DATA may give (551 and 553 answer only MAIL and RCPT).
_DATA_REPLY_CODES = frozenset({450, 451, 452, 550, 552, 554})
_STATUS_POS_RE = re.compile(r"(?<![\w.])[245]\.\d{1,3}\.\d{1,3}(?!\.?\d)")


def _first_reply_code(text: str) -> int | None:
    m = _REPLY_CODE_RE.search(text)
    return int(m.group(1)) if m else None


def _message_id_from(text: str) -> str | None:
    m = _MSGID_RE.search(text)
    return m.group(1) if m else None


def _make_record(
    recipient: str | None,
    status: str | None,
    reply_code: int | None,
    diagnostic: str,
    rules: Rules | None,
    *,
    extra_text: str = "",
    context: str = "",
    action: str | None = None,
    remote_mta: str | None = None,
    first_hand: bool = False,
) -> BounceRecord:
    diagnostic = diagnostic[: MAX_DIAGNOSTIC * 4]
    diag = _SPACES_RE.sub(" ", diagnostic).strip()[:MAX_DIAGNOSTIC]
    quoted_status, quoted_code = remote_status(diagnostic)
    if reply_code is None:
        reply_code = quoted_code
    if status is None:
        status = quoted_status or find_status(extra_text[:MAX_CONTEXT])
    # The reply's own words first; the report's text about this recipient only if they
    # do not say (a transcript or "in reply to …" sits next to the reply).
    stage = smtp_stage(diagnostic) or (smtp_stage(context[:MAX_STAGE_CONTEXT]) if context else None)
    code = status
    if (
        code
        and quoted_code
        and quoted_status is None
        and code.endswith(".0")
        and find_status(diagnostic) == code
    ):
        code = None  # a relay's catch-all code before the remote's code-less reply
    cls: Classification = classify(code, reply_code, diag, rules, stage=stage)
    if cls.category == "unknown" and extra_text:
        cls = classify(code, reply_code, extra_text[:MAX_CONTEXT], rules, stage=stage)
    gave_up = action == "delayed" or (action == "failed" and (status or "").startswith("4"))
    if gave_up and (
        cls.category == "unknown"
        or (cls.category == "system_error" and rule_tier(cls.rule, rules) != "text")
    ):
        # RFC 3464 §2.3.3: "delayed" means the MTA is still retrying, and "failed" with a
        # transient (4.X.X) status means it stopped retrying: with no more specific cause,
        # for the sender the message has not arrived in time.
        cls = Classification("expired", False, "transient-then-gave-up")
    if (
        cls.category == "user_unknown"
        and stage is None
        and not first_hand
        and reply_code in _DATA_REPLY_CODES
        and (status or "")[1:4] != ".1."
    ):
        # A relay quotes a remote "no such user" without an addressing code (RFC 3463
        # X.1.*) and without saying which command it answered: RFC 5321 §4.3.2 lets 550
        # answer DATA too, and filtering gateways refuse after DATA in these words. That is
        # no proof the address is bad, so the address is not suppressed for it.
        cls = Classification("blocked", False, "quoted-user-unknown-without-stage")
    klass = None
    if status is None:
        # No RFC 3463 code anywhere: keep at least the class (the reply code's, or
        # 4 for a delay report, else 5: the report says delivery failed).
        klass = (
            str(reply_code)[0]
            if reply_code and str(reply_code)[0] in "45"
            else ("4" if action == "delayed" else "5")
        )
        status = f"{klass}.0.0"
    return BounceRecord(
        recipient=recipient,
        status=status,
        reply_code=reply_code,
        diagnostic=diag,
        category=cls.category,
        hard=cls.hard,
        remote_mta=remote_mta,
        action=action,
    )


# ------------------------------------------------------------------------------ RFC 3464 DSN
_DSN_FIELD_RE = re.compile(r"(?im)^(final-recipient|original-recipient|action|status)[ \t]*:")


def _dsn_groups(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Per-message fields and per-recipient field groups (RFC 3464 §2.2, §2.3)."""
    blocks = re.split(r"\n[ \t]*\n", text.strip("\n"))
    groups: list[dict[str, str]] = []
    per_message: dict[str, str] = {}
    for block in blocks:
        fields, _ = _split_head(block.strip("\n") + "\n\n")
        if not fields:
            continue
        if (
            "final-recipient" in fields
            or "original-recipient" in fields
            or (groups and "status" in fields and "action" in fields)
        ):
            groups.append(fields)
        elif "reporting-mta" in fields or "received-from-mta" in fields or not groups:
            per_message.update(fields)
        if len(groups) >= MAX_RECORDS:
            break
    return per_message, groups


def _dsn_text_blocks(text: str) -> str | None:
    """DSN fields embedded in a text part (vendors that inline the machine part)."""
    m = re.search(r"(?im)^(?:reporting-mta|final-recipient|original-recipient)[ \t]*:", text)
    if m is None:
        return None
    return text[m.start() : m.start() + 20_000]


def _addr_field(value: str | None) -> str | None:
    if not value:
        return None
    # RFC 3464 §2.3.2: address-type ";" generic-address
    _, _, addr = value.rpartition(";")
    return _clean_addr(addr or value)


# ------------------------------------------------------------------------------ text bounces
_RCPT_HINT_RE = re.compile(
    r"(?:\bto|recipient|rcpt to|userid|deliver(?:ing)?(?: your mail| the mail| message)? to|"
    r"delivered to|unknown user|invalid user|message-id in|address|user)\s*:?\s*[\"<(\[]?\s*$",
    re.IGNORECASE,
)
_NON_RCPT_LINE_RE = re.compile(
    r"^\s*(?:from|reply-to|return-path|sender|cc|bcc|to|delivered-to|received|message-id|"
    r"x-[\w-]+|dkim-signature|by|for|\(envelope-from|envelope-from|mail from|>>> mail from|"
    r"<<< \d{3}[ -]<?[^>\s]*>?\.\.\. no access)\b",
    re.IGNORECASE,
)
_NEG_CONTEXT_RE = re.compile(
    r"(?:contact|mail from:?|envelope-from|from:|sender|return-path|reply-to|original message was "
    r"received|postmaster at|please (?:send|contact)|visit|helpdesk)\s*<?$",
    re.IGNORECASE,
)
_DECOR = " \t>*-•·:\"'<[(#"


def _recipient_lines(report: str, exclude: set[str]) -> list[tuple[str, int]]:
    """Candidate failed recipients in a plain-text report, with their offsets."""
    found: list[tuple[str, int]] = []
    seen: set[str] = set()
    pos = 0
    for line in report.split("\n"):
        start = pos
        pos += len(line) + 1
        if "@" not in line or _NON_RCPT_LINE_RE.match(line):
            continue
        matches = list(_ADDR_RE.finditer(line))
        if len(matches) > 1:
            # "a@x <b@y>: malformed address" names one recipient per line (Exim): the
            # address the error text follows, not each address the line mentions.
            tagged = [m for m in matches if re.match(r">?\s*:", line[m.end() :])]
            matches = tagged[:1] or matches[:1]
        for m in matches:
            addr = m.group(0).lower().rstrip(".")
            if addr in exclude or addr in seen:
                continue
            before = line[: m.start()]
            # "a@x <b@y>: …" leads with addresses: they are not words before the recipient.
            lead = (_ADDR_RE.sub("", before) if m.start() else before).strip(_DECOR)
            # "Recipient: <a>", "* a", ">>> a", "<a>:", "a: 550 …", "a [User unknown]",
            # "a on <date>", "554 <a>... reason" (sendmail transcript lines).
            at_start = (
                lead == ""
                or re.fullmatch(r"(?:recipient|rcpt|\d{3}(?:[ -]\d\.\d\.\d)?)", lead, re.IGNORECASE)
                is not None
            )
            hinted = _RCPT_HINT_RE.search(before) is not None
            if not (at_start or hinted) or _NEG_CONTEXT_RE.search(before):
                continue
            seen.add(addr)
            found.append((addr, start + m.start()))
            if len(found) >= MAX_RECORDS:
                return found
    return found


def _report_text(msg: _Message) -> tuple[str, str]:
    """The human-readable report and the rest (the returned original, if any)."""
    texts: list[str] = []
    rest: list[str] = []
    seen_original = False
    for part in msg.parts:
        if part.ctype in (
            "message/rfc822",
            "text/rfc822-headers",
            "message/rfc822-headers",
            "message/global",
            "message/global-headers",
        ):
            seen_original = True
            rest.append(part.text)
            continue
        if not part.ctype.startswith("text/") or (part.ctype == "text/html" and texts):
            continue
        text = part.text
        if part.ctype == "text/html":
            text = _html_to_text(text)
        if seen_original:
            rest.append(text)
            continue
        texts.append(text)
        if sum(len(t) for t in texts) > MAX_REPORT_TEXT:
            break
    joined = "\n".join(texts)[: MAX_REPORT_TEXT * 2]
    cut = len(joined)
    mark = _original_mark(joined)
    if mark is not None:
        cut = mark
    h = _HEADER_START_RE.search(joined, 0, cut)
    if h is not None:
        cut = h.start()
    rest.insert(0, joined[cut:])
    return joined[:cut][:MAX_REPORT_TEXT], "\n".join(rest)


_TAG_RE = re.compile(r"<[^<>]*>")
_HIDDEN_HTML_RE = re.compile(r"(?i)<(style|script|head)\b")


def _html_to_text(html: str) -> str:
    html = html[: MAX_REPORT_TEXT * 2]
    # Drop <style>/<script>/<head> blocks with find() rather than a lazy regex, which goes
    # quadratic on unclosed tags.
    kept: list[str] = []
    pos = 0
    low = html.lower()
    while (m := _HIDDEN_HTML_RE.search(html, pos)) is not None:
        kept.append(html[pos : m.start()])
        end = low.find("</" + m.group(1).lower(), m.end())
        if end < 0:
            pos = len(html)
            break
        close = low.find(">", end)
        pos = len(html) if close < 0 else close + 1
    kept.append(html[pos:])
    text = _TAG_RE.sub(" ", "".join(kept))
    return (
        text.replace("&nbsp;", " ").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )


def _looks_like_bounce(msg: _Message, subject: str) -> bool:
    h = msg.headers
    if "x-failed-recipients" in h:
        return True
    sender = h.get("from", "") + " " + h.get("sender", "")
    addrs = _addr_list(sender)
    daemon = (
        bool(_DAEMON_NAME_RE.search(sender))
        or any(_LOCAL_DAEMON_RE.match(a.split("@")[0]) for a in addrs)
        or not addrs
        or "<>" in sender
    )
    return (daemon and bool(_BOUNCE_SUBJECT_RE.search(subject))) or (
        bool(_BOUNCE_SUBJECT_RE.search(subject))
        and bool(re.search(r"(?i)mailer-daemon|postmaster|mail delivery", sender))
    )


_STRONG_BODY_RE = re.compile(
    r"(?i)(?:could not be delivered|couldn.t be delivered|wasn.t (?:able to deliver|delivered)|"
    r"(?:unable|not able|failed) to deliver|"
    r"delivery (?:to the following recipients? )?(?:has )?failed|"
    r"permanent(?:ly)? (?:error|fatal|failure|failed)|undeliverable|did not reach|"
    r"not (?:be )?delivered|error delivering|rejected (?:by|your)|delivery (?:problem|failure)|"
    r"following address(?:es)? (?:had|failed)|the following (?:recipients?|addresses)|"
    r"has not yet been delivered|address not found|duplicated message-id|"
    r"delivery status notification)"
)


# ------------------------------------------------------------------------------ main parse
def _subject(msg: _Message) -> str:
    return decode_header(msg.headers.get("subject", ""))


def _original_message_id(msg: _Message, rest: str) -> str | None:
    for part in msg.parts:
        if part.ctype in (
            "message/rfc822",
            "text/rfc822-headers",
            "message/rfc822-headers",
            "message/global",
            "message/global-headers",
        ):
            mid = _message_id_from(part.text[:50_000])
            if mid:
                return mid
    return _message_id_from(rest[:100_000]) if rest else None


def _parse_arf(msg: _Message, rules: Rules | None) -> BounceReport:
    # RFC 5965 §3: the second part is message/feedback-report, the third the original.
    fields: dict[str, str] = {}
    for part in msg.parts:
        if part.ctype == "message/feedback-report":
            fields, _ = _split_head(part.text.strip("\n") + "\n\n")
            break
    recipient = _addr_field(fields.get("original-rcpt-to"))
    original = ""
    for part in msg.parts:
        if part.ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            original = part.text
            break
    if recipient is None and original:
        oh, _ = _split_head(original)
        recipient = _clean_addr(oh.get("to", ""))
    if recipient is None:
        recipient = _clean_addr(fields.get("removal-recipient", ""))
    ftype = (fields.get("feedback-type") or "abuse").strip().lower()
    rec = BounceRecord(recipient, None, None, "", "complaint", False)
    return BounceReport(
        kind="complaint",
        records=(rec,),
        original_message_id=_message_id_from(original) if original else None,
        feedback_type=ftype,
        reporting_mta=fields.get("reporting-mta"),
    )


def _parse_ses_json(body: str, rules: Rules | None) -> BounceReport | None:
    """Amazon SES notifications (often wrapped in an SNS envelope) sent as mail."""
    start = body.find("{")
    end = body.rfind("}")
    if start < 0 or end <= start:
        return None
    # Mail transport may have wrapped long JSON lines: undo "\n " folds first.
    blob = re.sub(r"\n[ \t]", "", body[start : end + 1])
    try:
        data: Any = json.loads(blob, strict=False)
        if isinstance(data, dict) and isinstance(data.get("Message"), str):
            data = json.loads(data["Message"], strict=False)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    ntype = str(data.get("notificationType") or data.get("eventType") or "").lower()
    mail: dict[str, Any] = data["mail"] if isinstance(data.get("mail"), dict) else {}
    headers = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    mid = headers.get("messageId") if isinstance(headers, dict) else None
    message_id = str(mid) if mid else None
    if ntype == "complaint":
        c = data.get("complaint") or {}
        rcpts = [
            _clean_addr(str(r.get("emailAddress", "")))
            for r in c.get("complainedRecipients", [])
            if isinstance(r, dict)
        ]
        ftype = str(c.get("complaintFeedbackType") or "abuse")
        recs = tuple(BounceRecord(r, None, None, "", "complaint", False) for r in rcpts if r)
        return BounceReport("complaint", recs, message_id, ftype)
    if ntype == "delivery":
        d = data.get("delivery") or {}
        recs = tuple(
            BounceRecord(_clean_addr(str(r)), "2.0.0", 250, "", "delivered", False)
            for r in d.get("recipients", [])
        )
        return BounceReport("delivered", recs, message_id)
    if ntype != "bounce":
        return None
    b = data.get("bounce") or {}
    transient = str(b.get("bounceType", "")).lower() == "transient"
    out: list[BounceRecord] = []
    for r in b.get("bouncedRecipients", [])[:MAX_RECORDS]:
        if not isinstance(r, dict):
            continue
        diag = str(r.get("diagnosticCode") or "")
        status = find_status(str(r.get("status") or "")) or find_status(diag)
        sub = str(b.get("bounceSubType") or "")
        out.append(
            _make_record(
                _clean_addr(str(r.get("emailAddress", ""))),
                status,
                None,
                diag,
                rules,
                extra_text=sub,
                action="delayed" if transient and not diag else "failed",
            )
        )
    if not out:
        return None
    return BounceReport("bounce", tuple(out), message_id, reporting_mta=b.get("reportingMTA"))


def _dsn_records(
    msg: _Message, report: str, rules: Rules | None, *, inline: bool
) -> tuple[list[BounceRecord], list[BounceRecord], str | None] | None:
    text = None
    for part in msg.parts:
        if part.ctype in ("message/delivery-status", "message/global-delivery-status"):
            text = part.text
            break
    if (text is None or not _DSN_FIELD_RE.search(text)) and inline:
        # DSN fields pasted into a text part count only in mail that already looks like a
        # bounce: a person quoting a DSN is not one.
        text = None
        for part in msg.parts:
            if part.ctype.startswith("text/") and part.ctype != "text/html":
                text = _dsn_text_blocks(part.text)
                if text and _DSN_FIELD_RE.search(text):
                    break
                text = None
    if text is None:
        return None
    per_message, groups = _dsn_groups(text)
    everyone = [
        a
        for g in groups
        if (a := _addr_field(g.get("final-recipient")) or _addr_field(g.get("original-recipient")))
    ]
    failed: list[BounceRecord] = []
    ok: list[BounceRecord] = []
    for g in groups:
        recipient = (
            _addr_field(g.get("final-recipient"))
            or _addr_field(g.get("original-recipient"))
            or _addr_field(g.get("x-actual-recipient"))
        )
        action = (g.get("action") or "").strip().lower().split(" ")[0] or None
        status_field = g.get("status") or ""
        diag_field = g.get("diagnostic-code") or ""
        # RFC 3464 §2.3.6: "diagnostic-type; diagnostic" — drop the type.
        diag_type, sep, diag_text = diag_field.partition(";")
        if not sep or " " in diag_type.strip():
            diag_text = diag_field
        diag_text = diag_text.strip()
        status = find_status(status_field)
        diag_status, _ = remote_status(diag_text)
        # The remote server's own code is more precise than a generic field (x.0.0), a
        # relay's "other" detail (x.y.0) or what the reporting MTA mapped it to.
        if diag_status and (status is None or diag_status[0] == status[0] or status.endswith(".0")):
            status = diag_status
        elif diag_status is None and (status is None or status.endswith(".0.0")):
            # The relay's own code before a code-less remote reply still says more than
            # X.0.0 (it is reported, though the classification sets it aside).
            status = find_status(diag_text) or status
        block = _recipient_block(report, recipient, everyone) if recipient else ""
        if not diag_text and block:
            text_status = find_status(block)
            if text_status and (status is None or status.endswith(".0.0")):
                status = text_status
        comment = status_field.partition("(")[2]
        diagnostic = diag_text or block
        # RFC 3464 §2.3.6 makes Diagnostic-Code optional. A report whose fields give only
        # the reporting MTA's own class (X.0.0) and whose notice gives each recipient the
        # reply on its own line, "a@b: 550 …" (OpenSMTPD writes the reply its own SMTP
        # session got there, one line per envelope), carries the remote server's reply
        # first-hand: no relay stands between that reply and this report.
        first_hand = (
            not diag_text
            and (find_status(status_field) or "5.0.0").endswith(".0.0")
            and _NOTICE_LINE_RE.match(block) is not None
        )
        if action in ("delivered", "relayed", "expanded") or (status or "").startswith("2"):
            ok.append(
                BounceRecord(
                    recipient,
                    status,
                    _first_reply_code(diag_text),
                    diag_text,
                    "delivered",
                    False,
                    action=action,
                )
            )
            continue
        if action is None and status is None and not diag_text and not recipient:
            continue
        remote = _addr_field(g.get("remote-mta")) or (g.get("remote-mta") or "").partition(";")[2]
        out = _make_record(
            recipient,
            status,
            None,
            (comment + " " + diagnostic).strip(),
            rules,
            # With several recipients the shared text may be about another one.
            extra_text=block or (report if len(groups) == 1 else ""),
            action=action,
            remote_mta=remote.strip() or None,
            context=block or (report if len(groups) == 1 else ""),
            first_hand=first_hand,
        )
        failed.append(out)
        if len(failed) >= MAX_RECORDS:
            break
    reporting = per_message.get("reporting-mta", "").partition(";")[2].strip() or None
    return failed, ok, reporting


_ADDRESS_LINE_RE = re.compile(r"\n\s*<?[\w.+-]+@[\w.-]+>?:?\s*\n")


def _recipient_block(report: str, recipient: str, others: Sequence[str] = ()) -> str:
    """The part of a text report about one recipient: from its mention to the next line that
    names another recipient of the report (or a line that is only an address)."""
    if not report:
        return ""
    low = report.lower()
    i = low.find(recipient)
    if i < 0:
        return ""
    line_start = low.rfind("\n", 0, i) + 1
    line_end = low.find("\n", i)
    line_end = len(low) if line_end < 0 else line_end
    m = _ADDRESS_LINE_RE.search(low, i)
    end = m.start() if m else len(report)
    for other in others:
        if other == recipient:
            continue
        j = low.find(other, line_end)
        if j >= 0:
            # cut at the start of the line that names the other recipient
            end = min(end, low.rfind("\n", 0, j) + 1)
    return report[line_start : max(end, line_end)][:4000]


_DELAYED_RE = re.compile(
    r"(?i)has not yet been delivered|delayed|will (?:continue|keep) trying|will retry|"
    r"still trying"
)


def _text_records(
    msg: _Message, report: str, rest: str, rules: Rules | None, subject: str
) -> list[BounceRecord]:
    h = msg.headers
    exclude = set(_addr_list(h.get("to", "")) + _addr_list(h.get("from", "")))
    exclude.update(_addr_list(h.get("return-path", "")))
    candidates = _recipient_lines(report, exclude)
    failed = _addr_list(h.get("x-failed-recipients", ""))[:MAX_RECORDS]
    targets: list[tuple[str, int]]
    if failed:
        pos = {a: p for a, p in candidates}
        targets = [(a, pos.get(a, -1)) for a in dict.fromkeys(failed)]
    elif candidates:
        targets = candidates
    else:
        # Last resort: the returned original's recipient (RFC 5322 To of the copy).
        oh, _ = _split_head(rest.lstrip("\n")[:50_000]) if rest else ({}, "")
        to = _addr_list(oh.get("to", ""))
        targets = [(to[0], -1)] if len(set(to)) == 1 and to[0] not in exclude else []
    records: list[BounceRecord] = []
    offsets = sorted(p for _, p in targets if p >= 0)
    context = subject + "\n" + report
    delayed = _DELAYED_RE.search(report[:2000] + subject) is not None
    for addr, p in targets:
        if p >= 0:
            line_start = report.rfind("\n", 0, p) + 1
            earlier = [o for o in offsets if o < p]
            later = [o for o in offsets if o > p]
            end = later[0] if later else len(report)
            end_line = report.rfind("\n", 0, end) + 1 if later else end
            # Sendmail transcripts give the remote reply before the recipient line:
            # "While talking to host: >>> RCPT To:<a> <<< 550 …" then "554 <a>... …".
            floor = report.find("\n", earlier[-1]) + 1 if earlier else 0
            talk = report.rfind("While talking to", floor, line_start)
            block = report[talk if talk >= 0 else line_start : max(end_line, p + 1)]
        else:
            block = report
        # With several recipients the shared text may be about another one: only a lone
        # recipient falls back on the whole report.
        extra = context if len(targets) == 1 or p < 0 else subject
        records.append(
            _make_record(
                addr,
                None,
                None,
                block,
                rules,
                extra_text=extra,
                context=block,
                action="delayed" if delayed else "failed",
            )
        )
    return records


def _is_auto_reply(msg: _Message, subject: str, report: str) -> bool:
    h = msg.headers
    # RFC 3834 §5: Auto-Submitted: auto-replied marks replies made by automatons.
    auto = h.get("auto-submitted", "").lower()
    if "x-autoreply" in h or "x-autorespond" in h or "x-autoresponder" in h:
        return True
    if (
        h.get("precedence", "").lower() == "auto_reply"
        or "auto_reply" in h.get("x-precedence", "").lower()
    ):
        return True
    if _AUTOREPLY_SUBJECT_RE.search(subject):
        return True
    return auto.startswith("auto-replied") and bool(_AUTOREPLY_BODY_RE.search(report[:4000]))


def _wrapped_report(msg: _Message, report: str, rules: Rules | None) -> BounceReport | None:
    h = msg.headers
    exclude = set(_addr_list(h.get("to", "")) + _addr_list(h.get("from", "")))
    if _recipient_lines(report, exclude):
        return None
    for part in msg.parts:
        if part.ctype in ("message/rfc822", "message/global"):
            inner = parse_message(part.text.encode("utf-8", "replace"), rules, _nested=True)
            return inner if inner.kind == "bounce" else None
    return None


def parse_message(raw: bytes, rules: Rules | None = None, *, _nested: bool = False) -> BounceReport:
    """Parse a raw message; may raise on pathological input (use parse())."""
    msg = _load(raw)
    subject = _subject(msg)
    _, top_params = _content_type(msg.headers.get("content-type"))
    report, rest = _report_text(msg)
    # RFC 5965 §2: multipart/report; report-type=feedback-report.
    if top_params.get("report-type", "").lower() == "feedback-report" or any(
        p.ctype == "message/feedback-report" for p in msg.parts
    ):
        return _parse_arf(msg, rules)
    if msg.headers.get("x-apple-unsubscribe", "").strip().lower() == "true":
        # Apple Mail's "unsubscribe" button sends a mail flagged X-Apple-Unsubscribe: the
        # recipient asks to stop mail; treat it like an ARF opt-out (RFC 5965 §7.3).
        who = _clean_addr(msg.headers.get("from", ""))
        rec = BounceRecord(who, None, None, "", "complaint", False)
        return BounceReport("complaint", (rec,), None, feedback_type="opt-out")
    if '"notificationType"' in report or '\\"notificationType\\"' in report:
        ses = _parse_ses_json(report, rules)
        if ses is not None:
            return ses
    message_id = _original_message_id(msg, rest)
    looks_like_bounce = _looks_like_bounce(msg, subject)
    dsn = _dsn_records(
        msg,
        report,
        rules,
        inline=looks_like_bounce or top_params.get("report-type", "").lower() == "delivery-status",
    )
    if dsn is not None:
        failed, ok, reporting = dsn
        if failed:
            return BounceReport("bounce", tuple(failed), message_id, reporting_mta=reporting)
        if ok:
            return BounceReport("delivered", tuple(ok), message_id, reporting_mta=reporting)
    bounce_like = looks_like_bounce or (
        top_params.get("report-type", "").lower() == "delivery-status"
    )
    if not bounce_like and not _is_auto_reply(msg, subject, report):
        sender = msg.headers.get("from", "")
        bounce_like = bool(_STRONG_BODY_RE.search(report[:6000])) and (
            bool(_DAEMON_NAME_RE.search(sender))
            or any(_LOCAL_DAEMON_RE.match(a.split("@")[0]) for a in _addr_list(sender))
            or not _addr_list(sender)
        )
    if not bounce_like and _TRANSCRIPT_REFUSAL_RE.search(report):
        # An SMTP transcript in which RCPT TO was refused (a Postfix postmaster copy, a
        # gateway's notice naming the recipient only in the transcript): a delivery
        # failure report whatever its sender or subject says.
        bounce_like = True
    if bounce_like and dsn is None and not _nested and "x-failed-recipients" not in msg.headers:
        # Some gateways wrap the real DSN in a message/rfc822 part of an otherwise empty
        # notice: when the outer text names nobody, read the wrapped report (one level).
        inner = _wrapped_report(msg, report, rules)
        if inner is not None:
            return inner
    if bounce_like:
        records = _text_records(msg, report, rest, rules, subject)
        if records:
            return BounceReport("bounce", tuple(records), message_id)
        if (
            dsn is not None
            or "x-failed-recipients" in msg.headers
            or _STRONG_BODY_RE.search(report[:6000])
        ):
            rec = _make_record(None, None, None, report, rules, extra_text=subject)
            return BounceReport("bounce", (rec,), message_id)
    if not bounce_like and not _nested:
        forwarded = _forwarded_report(msg, rules)
        if forwarded is not None:
            return forwarded
    if _is_auto_reply(msg, subject, report):
        return BounceReport("auto_reply", (), message_id)
    return BounceReport("not_bounce", (), None)


# "In:  RCPT TO:<a>" / "Out: 550 …" (Postfix's postmaster notices), ">>> RCPT To:<a>" /
# "<<< 550 …" (sendmail): a client's RCPT TO answered by a refusal on the next line.
_TRANSCRIPT_REFUSAL_RE = re.compile(
    r"(?im)^[ \t]*(?:in:|>>>|->|c:)?[ \t]*rcpt to:[ \t]*<[^>\n]{1,300}>[^\n]{0,200}\n"
    r"[ \t]*(?:out:|<<<|<-|s:)?[ \t]*[45]\d\d[ -]"
)
# Where a person's mail client starts a forwarded message (Gmail, Apple Mail, Outlook,
# Thunderbird; English, German, French, Spanish).
_FORWARD_MARK_RE = re.compile(
    r"(?im)^[ \t>]*(?:-{2,}[ \t]*(?:forwarded message|original message|weitergeleitete nachricht|"
    r"message transf[ée]r[ée]|mensaje reenviado|urspr[üu]ngliche nachricht)[ \t]*-{2,}|"
    r"begin forwarded message:|-{2,}[ \t]*forwarded by [^\n]{1,200})[ \t]*$"
)
_QUOTE_PREFIX_RE = re.compile(r"(?m)^> ?")


def _forwarded_report(msg: _Message, rules: Rules | None) -> BounceReport | None:
    """A bounce a person forwarded: attached as a message, or inline after the mail client's
    "Forwarded message" line with the bounce's own header lines (read one level deep)."""
    for part in msg.parts:
        if part.ctype in ("message/rfc822", "message/global"):
            inner = parse_message(part.text.encode("utf-8", "replace"), rules, _nested=True)
            if inner.kind == "bounce":
                return inner
    for part in msg.parts:
        if not part.ctype.startswith("text/") or part.ctype == "text/html":
            continue
        text = part.text[:MAX_PART_TEXT]
        m = _FORWARD_MARK_RE.search(text)
        if m is None:
            continue
        inner_text = text[m.end() :].lstrip("\n")
        if inner_text.startswith(">"):
            inner_text = _QUOTE_PREFIX_RE.sub("", inner_text)
        head, _ = _split_head(inner_text)
        if "from" not in head or "subject" not in head:
            continue
        inner = parse_message(inner_text.encode("utf-8", "replace"), rules, _nested=True)
        if inner.kind == "bounce":
            return inner
    return None


def parse(raw: bytes, rules: Rules | None = None) -> BounceReport:
    """Parse a raw message into a BounceReport; never raises (errors give "not_bounce")."""
    try:
        return parse_message(raw, rules)
    except Exception:
        return NOT_BOUNCE


def message_text(raw: bytes) -> str:
    """Everything a classification rule could read in a message: the subject and every text
    part, decoded (for evaluation tools that ask which phrases a sample contains)."""
    try:
        msg = _load(raw)
    except Exception:
        return ""
    texts = [_subject(msg)]
    for part in msg.parts:
        if part.ctype.startswith("text/") or part.ctype.startswith("message/"):
            texts.append(_html_to_text(part.text) if part.ctype == "text/html" else part.text)
    return "\n".join(texts)


def parse_for_scoring(raw: bytes, rules: Rules | None = None) -> dict[str, Any]:
    """The dict shape the bounce corpus scorer (shared/bounce-corpus/score.py) expects."""
    report = parse(raw, rules)
    primary = report.primary
    records = [
        {"recipient": r.recipient, "status": r.status, "reason": r.category, "hard": r.hard}
        for r in report.records
    ]
    return {
        "is_bounce": report.is_bounce,
        "kind": report.kind,
        "recipient": primary.recipient if primary else None,
        "status": primary.status if primary else None,
        "reason": primary.category if primary and report.is_bounce else None,
        "hard": primary.hard if primary and report.is_bounce else None,
        "recipients": records if report.is_bounce else [],
        "original_message_id": report.original_message_id,
        "feedback_type": report.feedback_type,
    }
