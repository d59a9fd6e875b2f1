"""The closed vocabulary of delivery outcomes, and the SMTP reply they carry."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Self, TypeAlias, cast

__all__ = [
    "Delivered",
    "HardFail",
    "Held",
    "Outcome",
    "Reply",
    "SoftFail",
]

# RFC 5321 §4.2: a reply line is a three-digit code, then "-" (more lines follow) or
# " " / end of line (last line), then text.
_REPLY_LINE = re.compile(r"^([2-5][0-9][0-9])(?:([ -])(.*)|)$", re.DOTALL)

# RFC 3463 §2: class "." subject "." detail, class 2/4/5, subject and detail 1-3 digits;
# RFC 2034 §4: it starts the text of every line, followed by a space (or the end).
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, RFC 3463 enhanced status (if given) and text lines."""

    code: int
    enhanced_status: str | None
    text: str
    """The reply text without code and enhanced status; lines of a multi-line reply
    are joined with "\\n"."""

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced_status:
            parts.append(self.enhanced_status)
        if self.text:
            parts.append(" ".join(self.text.splitlines()))
        return " ".join(parts)

    @property
    def is_positive(self) -> bool:
        """2xx: the command was accepted (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: go on (354 after DATA)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: transient negative completion, try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: permanent negative completion, do not repeat."""
        return 500 <= self.code < 600

    @classmethod
    def from_parts(cls, code: int, text: str) -> Self:
        """A reply from its code and text lines (as transport libraries hand them over).

        The enhanced status is taken from the first line when its class matches the
        code's class (RFC 3463 §2); it is removed from every line that repeats it.
        """
        # A server answers most commands with the same words every time ("250 2.0.0 OK"),
        # and a Reply is immutable: parse each distinct reply once.
        reply = _reply_from_parts(code, text)
        if cls is not Reply:  # a subclass: its own instance
            return cls(code=reply.code, enhanced_status=reply.enhanced_status, text=reply.text)
        return cast(Self, reply)

    @classmethod
    def parse(cls, raw: str) -> Self:
        """Parse raw reply text (one or more lines, CRLF or LF) into a Reply.

        Raises ValueError when the text is not an SMTP reply: a line without a valid
        2xx-5xx code, lines with differing codes, or continuation lines ("-") without a
        last line.
        """
        lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError("empty SMTP reply")
        code: str | None = None
        texts: list[str] = []
        for index, line in enumerate(lines):
            match = _REPLY_LINE.match(line)
            if match is None:
                raise ValueError(f"malformed SMTP reply line: {line[:80]!r}")
            if code is not None and match.group(1) != code:
                # RFC 5321 §4.2.1: every line of a multi-line reply has the same code.
                raise ValueError(f"SMTP reply code changes mid-reply: {line[:80]!r}")
            code = match.group(1)
            is_last = match.group(2) != "-"
            if is_last != (index == len(lines) - 1):
                raise ValueError("SMTP reply lines out of order (continuation after last line)")
            texts.append(match.group(3) or "")
        assert code is not None
        return cls.from_parts(int(code), "\n".join(texts))


@functools.lru_cache(maxsize=1024)
def _reply_from_parts(code: int, text: str) -> Reply:
    """Reply.from_parts, uncached."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    enhanced: str | None = None
    match = _ENHANCED.match(lines[0].lstrip())
    if match and match.group(1) == str(code)[0]:
        enhanced = match.group(0)
        stripped = []
        for line in lines:
            line = line.strip()
            if line == enhanced or line.startswith(enhanced + " "):
                line = line[len(enhanced) :].strip()
            stripped.append(line)
        lines = stripped
    else:
        lines = [line.strip() for line in lines]
    while len(lines) > 1 and not lines[-1]:
        lines.pop()
    return Reply(code=code, enhanced_status=enhanced, text="\n".join(lines))


@dataclass(frozen=True, slots=True)
class Delivered:
    """The receiving server accepted responsibility for the message (2xx after DATA)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class SoftFail:
    """A transient failure: try again later (4xx, timeouts, network and TLS errors).

    `retry_after` is the remote's own "try again in N" hint in seconds, if it gave one.
    `reply` is None when no reply was received (connection refused, timeout, ...).
    """

    reply: Reply | None
    retry_after: float | None
    reason: str
    stage: str | None = None  # as in HardFail


@dataclass(frozen=True, slots=True)
class HardFail:
    """A permanent failure: do not retry (5xx, or a local decision such as SMTPUTF8).

    `reply` is the full remote reply, or None when the failure was decided locally.
    `stage` is the SMTP command the reply answered ("connect", "mail", "rcpt", "data"),
    when a remote server refused: RFC 5321 §3.3 gives the same words different meanings
    there (an unknown user at RCPT is a bad address, after DATA a content filter).
    """

    reply: Reply | None
    reason: str
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """Not sent, on purpose: waiting for a human or a limit (abuse hold, shaping)."""

    reason: str


Outcome: TypeAlias = Delivered | SoftFail | HardFail | Held
