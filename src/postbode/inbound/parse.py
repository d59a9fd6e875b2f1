"""An inbound message parsed into the JSON payload its route receives: addresses, subject and
threading headers, text and HTML bodies (decoded, charset-correct), the reply alone, and the
attachments. Hostile input is bounded (depth, parts, sizes) and never raises: what cannot be
read is said in `warnings`."""

from __future__ import annotations

import base64
import codecs
import email.header
import email.utils
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

from mailparser_reply import EmailMessage as ReplyParser

log = logging.getLogger(__name__)

MAX_DEPTH = 12  # MIME nesting followed; deeper multiparts are handed over as one attachment
MAX_PARTS = 200  # parts looked at; the rest are left out, with a warning
MAX_HEADERS = 500  # header fields in the payload
MAX_HEADER_VALUE = 8192  # characters of one header value in the payload
MAX_BODY_CHARS = 2_000_000  # of each of the text and HTML bodies
MAX_REPLY_INPUT = 100_000  # characters of the text body the reply is looked for in
# Languages whose "On … wrote:" lines and signatures the reply parser knows (mail-parser-reply).
REPLY_LANGUAGES = ("en", "de", "nl", "fr", "es", "it")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# (inbound id, attachment index) -> a signed URL for an attachment too large to inline
LinkMaker = Callable[[int], str]


@dataclass
class Attachment:
    """One attachment: what it is, and its bytes."""

    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None
    inline: bool = False

    def as_json(self, index: int, inline_limit: int, link: LinkMaker | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type,
            "size": len(self.content),
            "content_id": self.content_id,
            "sha256": hashlib.sha256(self.content).hexdigest(),
        }
        if len(self.content) <= inline_limit or link is None:
            data["content"] = base64.b64encode(self.content).decode("ascii")
        else:
            data["content"] = None
            data["url"] = link(index)
        return data


@dataclass
class Parsed:
    """What a message says, decoded."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    # the same, encoded words not decoded: addresses are parsed before names are decoded
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    html: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def header(self, name: str) -> str:
        wanted = name.lower()
        return next((v for n, v in self.headers if n.lower() == wanted), "")

    def addresses(self, name: str) -> list[dict[str, str]]:
        """The addresses of every `name` header field: [{"email", "name"}]."""
        wanted = name.lower()
        values = [v for n, v in self.raw_headers if n.lower() == wanted]
        try:
            pairs = email.utils.getaddresses(values)
        except Exception:  # the stdlib parser on hostile input: nothing usable
            return []
        return [
            {"email": clean(a, 320), "name": clean(decode_words(n), 320)} for n, a in pairs if a
        ]


def clean(text: str, limit: int | None = None) -> str:
    """Text fit for JSON and every store: no NUL or other C0 controls but tab and line
    breaks, no lone surrogates, optionally bounded."""
    text = _CONTROL.sub("\ufffd", text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if limit is None else text[:limit]


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_BETWEEN_WORDS = re.compile(r"(=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=)\s+(?==\?)")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded one by one (a broken one is left as written), so that
    8-bit text around them (RFC 6532) does not stop the others being read."""

    def one(found: re.Match[str]) -> str:
        try:
            return str(email.header.make_header(email.header.decode_header(found.group(0))))
        except Exception:
            return found.group(0)

    # RFC 2047 §6.2: white space between adjacent encoded words is not displayed.
    return _ENCODED_WORD.sub(one, _BETWEEN_WORDS.sub(r"\1", text))


def header_text(value: Any) -> str:
    """A header value as text, encoded words left as they are: 8-bit bytes are taken as
    UTF-8 (RFC 6532), else Windows-1252; unfolded."""
    if isinstance(value, email.header.Header):  # compat32 gives 8-bit values as Header
        text = "".join(
            decode_text(part, charset) if isinstance(part, bytes) else part
            for part, charset in email.header.decode_header(value)
        )
    else:
        text = str(value)
    return " ".join(text.replace("\r", "").replace("\n", " ").split())


def decode_header(value: Any) -> str:
    """A header value as text, for display: encoded words decoded, control characters
    replaced, bounded."""
    return clean(decode_words(header_text(value)), MAX_HEADER_VALUE)


def decode_text(payload: bytes, charset: str | None) -> str:
    """Body bytes as text in their declared charset; without one (or an unknown one) UTF-8,
    else Windows-1252, which decodes anything."""
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            codecs.lookup(candidate)
            return payload.decode(candidate)
        except (LookupError, UnicodeError, ValueError):
            continue
    return payload.decode("cp1252", "replace")


def parse(raw: bytes) -> Parsed:
    """The message's headers, bodies and attachments; never raises."""
    parsed = Parsed()
    try:
        msg = BytesParser(policy=compat32).parsebytes(raw)
    except RecursionError:
        parsed.warnings.append("the MIME structure is nested too deeply to read")
        msg = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    except Exception as exc:  # the parser itself failed: headers only
        parsed.warnings.append(f"the message could not be parsed: {type(exc).__name__}")
        msg = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    for defect in getattr(msg, "defects", [])[:5]:
        parsed.warnings.append(f"MIME defect: {type(defect).__name__}")
    for name, value in msg.items()[:MAX_HEADERS]:
        key = clean(str(name), 200)
        text = header_text(value)
        parsed.raw_headers.append((key, clean(text, MAX_HEADER_VALUE)))
        parsed.headers.append((key, clean(decode_words(text), MAX_HEADER_VALUE)))
    try:
        _walk(msg, parsed)
    except RecursionError:
        parsed.warnings.append("the MIME structure is nested too deeply to read")
    except Exception as exc:  # a bug or an input the stdlib chokes on: what was read stays
        log.warning("inbound: walking a message failed", exc_info=True)
        parsed.warnings.append(f"part of the message could not be read: {type(exc).__name__}")
    for name in ("text", "html"):
        if len(getattr(parsed, name)) > MAX_BODY_CHARS:
            parsed.warnings.append(f"the {name} body is cut at {MAX_BODY_CHARS} characters")
    # Line ends as JSON readers expect them: "\n" (the wire's CRLF is SMTP's, RFC 5321 §2.3.8).
    parsed.text = clean(parsed.text.replace("\r\n", "\n"), MAX_BODY_CHARS)
    parsed.html = clean(parsed.html.replace("\r\n", "\n"), MAX_BODY_CHARS)
    return parsed


def _walk(msg: Message, parsed: Parsed) -> None:
    """Every leaf part, depth first, bounded in depth and count."""
    count = 0
    for part, depth in _parts(msg):
        count += 1
        if count > MAX_PARTS:
            parsed.warnings.append(f"more than {MAX_PARTS} MIME parts: the rest are left out")
            return
        if depth > MAX_DEPTH:
            parsed.warnings.append(f"MIME parts nested deeper than {MAX_DEPTH} are attached whole")
            parsed.attachments.append(
                Attachment("nested-part.eml", "message/rfc822", _as_bytes(part))
            )
            continue
        _leaf(part, parsed)


def _parts(msg: Message) -> Iterator[tuple[Message, int]]:
    """Leaf parts with their depth (a multipart deeper than MAX_DEPTH is yielded as a leaf);
    an explicit stack, so nesting costs no recursion here."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            if depth >= MAX_DEPTH:
                yield part, depth + 1
                continue
            stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, Message))
        else:
            yield part, depth


def _leaf(part: Message, parsed: Parsed) -> None:
    ctype = part.get_content_type()
    disposition = header_text(part.get("content-disposition") or "").split(";")[0]
    disposition = disposition.strip().lower()
    filename = _filename(part)
    if ctype == "message/rfc822" or isinstance(part.get_payload(), list):
        name = filename or "attached-message.eml"
        parsed.attachments.append(Attachment(name, ctype, _as_bytes(part, inner=True)))
        return
    payload = part.get_payload(decode=True)
    content = payload if isinstance(payload, bytes) else b""
    is_body = disposition != "attachment" and not filename
    if is_body and ctype == "text/plain":
        text = decode_text(content, part.get_content_charset())
        parsed.text = f"{parsed.text}\n{text}" if parsed.text else text
        return
    if is_body and ctype == "text/html" and not parsed.html:
        parsed.html = decode_text(content, part.get_content_charset())
        return
    cid = part.get("content-id")
    parsed.attachments.append(
        Attachment(
            filename or _default_name(ctype, len(parsed.attachments)),
            clean(ctype, 255),
            content,
            clean(header_text(cid), 998) if cid else None,
            inline=disposition == "inline",
        )
    )


def _filename(part: Message) -> str:
    try:
        name = part.get_filename()
    except Exception:  # a broken RFC 2231 parameter
        return ""
    return decode_header(name)[:255] if name else ""


def _default_name(ctype: str, index: int) -> str:
    extension = {"text/plain": "txt", "text/html": "html", "text/calendar": "ics"}.get(ctype)
    return f"attachment-{index + 1}.{extension or 'bin'}"


def _as_bytes(part: Message, *, inner: bool = False) -> bytes:
    """A part (or, `inner`, the message it carries) as bytes, as near as can be rebuilt."""
    try:
        if inner and isinstance(part.get_payload(), list) and part.get_payload():
            first = part.get_payload(0)
            if isinstance(first, Message):
                return first.as_bytes(policy=compat32)
        return part.as_bytes(policy=compat32)
    except Exception:
        raw = part.get_payload(decode=False)
        return raw.encode("utf-8", "replace") if isinstance(raw, str) else b""


def stripped_reply(text: str) -> str:
    """The reply alone: the text above the quoted history ("On … wrote:" and `>` lines),
    without the signature, by mail-parser-reply."""
    if not text.strip():
        return ""
    try:
        reply = ReplyParser(
            text=text[:MAX_REPLY_INPUT], languages=list(REPLY_LANGUAGES), keep_hyphen_lists=True
        ).read()
        return clean(reply.replies[0].body) if reply.replies else ""
    except Exception:  # the library on odd input: no stripped reply rather than no hand-off
        log.warning("inbound: the reply could not be separated", exc_info=True)
        return ""


# -- payloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """What the SMTP conversation said about an inbound message, and where it goes."""

    id: str
    mail_from: str
    rcpt_to: str
    mailbox_hash: str
    received_at: str  # ISO 8601
    client_ip: str | None
    helo: str | None
    route_id: int | None
    match: str | None


def native_payload(
    parsed: Parsed,
    envelope: Envelope,
    verification: dict[str, Any] | None,
    *,
    inline_limit: int,
    link: LinkMaker | None,
) -> dict[str, Any]:
    """Postbode's own JSON for an inbound message (documented in docs/inbound.md)."""
    sender = parsed.addresses("from")
    references = parsed.header("references").split()
    return {
        "type": "inbound.message",
        "id": envelope.id,
        "received_at": envelope.received_at,
        "route": {"id": envelope.route_id, "match": envelope.match},
        "envelope": {
            "mail_from": envelope.mail_from,
            "rcpt_to": envelope.rcpt_to,
            "client_ip": envelope.client_ip,
            "helo": envelope.helo,
        },
        "mailbox_hash": envelope.mailbox_hash,
        "from": sender[0] if sender else None,
        "to": parsed.addresses("to"),
        "cc": parsed.addresses("cc"),
        "reply_to": parsed.addresses("reply-to"),
        "subject": parsed.header("subject"),
        "date": parsed.header("date") or None,
        "message_id": parsed.header("message-id") or None,
        "in_reply_to": parsed.header("in-reply-to") or None,
        "references": references,
        "text": parsed.text,
        "html": parsed.html,
        "stripped_text_reply": stripped_reply(parsed.text),
        "headers": [{"name": n, "value": v} for n, v in parsed.headers],
        "attachments": [a.as_json(i, inline_limit, link) for i, a in enumerate(parsed.attachments)],
        "verification": verification,
        "warnings": parsed.warnings,
    }


def _postmark_address(address: dict[str, str]) -> dict[str, str]:
    local = address["email"].rpartition("@")[0]
    return {
        "Email": address["email"],
        "Name": address["name"],
        "MailboxHash": local.partition("+")[2],
    }


def postmark_payload(
    parsed: Parsed,
    envelope: Envelope,
    verification: dict[str, Any] | None,
    *,
    inline_limit: int,
    link: LinkMaker | None,
) -> dict[str, Any]:
    """Postmark's inbound webhook JSON, field for field, so that code written for Postmark's
    inbound works unchanged. Verification results travel as headers, as Postmark passes its
    checks (`Received-SPF`, `Authentication-Results`)."""
    native = native_payload(parsed, envelope, verification, inline_limit=inline_limit, link=link)
    sender = native["from"] or {"email": "", "name": ""}
    headers = [{"Name": h["name"], "Value": h["value"]} for h in native["headers"]]
    if verification:
        headers.insert(0, {"Name": "Authentication-Results", "Value": verification["header"]})
    attachments = []
    for a in native["attachments"]:
        item = {
            "Name": a["filename"],
            "Content": a["content"] or "",
            "ContentType": a["content_type"],
            "ContentLength": a["size"],
            "ContentID": a["content_id"] or "",
        }
        if a.get("url"):
            item["ContentUrl"] = a["url"]  # too large to inline: Content is empty
        attachments.append(item)

    def joined(values: list[dict[str, str]]) -> str:
        def one(v: dict[str, str]) -> str:
            name = v["name"].replace("\\", "\\\\").replace('"', '\\"')
            return f'"{name}" <{v["email"]}>' if name else v["email"]

        return ", ".join(one(v) for v in values)

    return {
        "FromName": sender["name"],
        "MessageStream": "inbound",
        "From": sender["email"],
        "FromFull": _postmark_address(sender),
        "To": parsed.header("to"),
        "ToFull": [_postmark_address(a) for a in native["to"]],
        "Cc": parsed.header("cc"),
        "CcFull": [_postmark_address(a) for a in native["cc"]],
        "Bcc": "",
        "BccFull": [],
        "OriginalRecipient": envelope.rcpt_to,
        "ReplyTo": joined(native["reply_to"]),
        "Subject": native["subject"],
        "MessageID": envelope.id,
        "Date": native["date"] or "",
        "MailboxHash": envelope.mailbox_hash,
        "TextBody": native["text"],
        "HtmlBody": native["html"],
        "StrippedTextReply": native["stripped_text_reply"],
        "Tag": "",
        "Headers": headers,
        "Attachments": attachments,
    }


FORMATS: dict[str, Callable[..., dict[str, Any]]] = {
    "native": native_payload,
    "postmark": postmark_payload,
}
