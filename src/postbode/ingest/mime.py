"""Builds the RFC 5322 message of an API send request, and checks its addresses and headers."""

from __future__ import annotations

import binascii
import contextlib
import functools
import random
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.policy import SMTP, SMTPUTF8, EmailPolicy, compat32
from email.utils import collapse_rfc2231_value

from email_validator import EmailNotValidError, ValidatedEmail, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from email_validator.rfc_constants import DOT_ATOM_TEXT as _ASCII_DOT_ATOM

# RFC 5322 §2.1.1: a line is at most 998 octets; RFC 5322 §3.6.8: field-name = 1*ftext.
MAX_HEADER_NAME = 76
MAX_HEADER_VALUE = 998
MAX_DISPLAY_NAME = 200
_FTEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+")

# Headers an API caller may not set, and why (the message of the 422).
RESERVED_HEADERS: dict[str, str] = {
    "from": "use the `from` field",
    "to": "use the `to` field",
    "cc": "use the `cc` field",
    "bcc": "use the `bcc` field; Bcc recipients are never shown in the message",
    "reply-to": "use the `reply_to` field",
    "subject": "use the `subject` field",
    "sender": "the sender is the `from` address",
    "date": "Postbode dates the message when it accepts it",
    "orig-date": "Postbode dates the message when it accepts it",
    "message-id": "Postbode gives every message its Message-ID (returned as `message_id`)",
    "mime-version": "Postbode builds the MIME structure",
    "return-path": "trace fields are added by mail servers",
    "received": "trace fields are added by mail servers",
    "delivered-to": "trace fields are added by mail servers",
    "received-spf": "trace fields are added by mail servers",
    "authentication-results": "trace fields are added by mail servers",
    "dkim-signature": "Postbode signs the message with the domain's DKIM key",
    "domainkey-signature": "Postbode signs the message with the domain's DKIM key",
}
RESERVED_PREFIXES: dict[str, str] = {
    "content-": "Postbode builds the MIME structure from `text`, `html` and `attachments`",
    "resent-": "resent fields (RFC 5322 §3.6.6) are for re-sending by a mail client",
    "arc-": "ARC fields are added by mail servers",
    "x-postbode-": "use the API fields (`tag`, `metadata`, `stream`, `track_opens` …)",
}

# RFC 2045 §5.1: type "/" subtype *(";" parameter), parameter = token "=" (token / quoted-string)
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # noqa: S105 (an RFC 2045 token, no secret)
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\x20-\x7e])*"'
_CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})((?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*)")
_PARAM = re.compile(rf"\s*;\s*({_TOKEN})=({_TOKEN}|{_QUOTED})")
_NAME_ADDR = re.compile(r"(?s)(.*?)\s*<([^<>]*)>")
_ASCII_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?[^?\s]*\?=")  # RFC 2047 §2
_LINESEP = "\r\n"


class MimeError(ValueError):
    """A value that cannot go into the message; `code` names the problem for the API."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Mailbox:
    """An address with its optional display name; the domain in IDNA ASCII form."""

    local_part: str
    domain: str
    display_name: str = ""

    @property
    def address(self) -> str:
        return f"{self.local_part}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """RFC 6531: a non-ASCII local part can only travel with SMTPUTF8."""
        return not self.local_part.isascii()

    def header(self) -> Address:
        return Address(self.display_name, username=self.local_part, domain=self.domain)


@dataclass(frozen=True)
class Attachment:
    filename: str
    maintype: str
    subtype: str
    data: bytes
    params: dict[str, str] = field(default_factory=dict)
    # An inline part (RFC 2392 `cid:` URLs in the HTML refer to it), not an attachment.
    content_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "filename", display_filename(self.filename))


# -- attachment file names ----------------------------------------------------------------------
# A file name is shown to the recipient and used by their mail client to save the file. It may
# not climb directories (`../`, path separators of any system), nor hold control characters,
# nor Unicode format characters: the bidi overrides (U+202A-U+202E, U+2066-U+2069) make
# "invoice\u202efdp.exe" read as "invoiceexe.pdf".
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
MAX_FILENAME = 255
DEFAULT_FILENAME = "attachment"


def display_filename(name: str) -> str:
    """`name` as it may be shown and saved: the last path component, without control,
    format or unassigned characters, runs of white space made one space, no leading dots,
    at most MAX_FILENAME characters; DEFAULT_FILENAME when nothing is left."""
    shown = "".join(
        " " if unicodedata.category(c) == "Zs" else c
        for c in name
        if unicodedata.category(c) not in _HIDDEN_CATEGORIES
    )
    base = re.split(r"[/\\]", shown)[-1]
    base = " ".join(base.split()).lstrip(". ")
    return base[:MAX_FILENAME].rstrip() or DEFAULT_FILENAME


_NAME_PARAM = re.compile(rb"(?i)[\s;](?:file)?name\*?(?:\d+\*?)?\s*=")
_CRLF_COMPAT = compat32.clone(linesep="\r\n")


def names_attachments(raw: bytes) -> bool:
    """Whether a message may carry a file name (a cheap look before `safe_attachment_names`)."""
    # Most messages hold no "name" at all: finding that in the lower-cased bytes is many times
    # cheaper than the case-blind pattern, which tries at every white space.
    return b"name" in raw.lower() and _NAME_PARAM.search(raw) is not None


def safe_attachment_names(raw: bytes) -> bytes:
    """The message with every part's file name (Content-Disposition filename, Content-Type
    name; RFC 2231 or encoded words) made a `display_filename`. The very bytes given when
    no name needed a change."""
    msg = message_from_bytes(raw, policy=_CRLF_COMPAT)
    changed = False
    for part in msg.walk():
        for header, param in (("content-disposition", "filename"), ("content-type", "name")):
            name = _param_text(part, header, param)
            if name is None:
                continue
            safe = display_filename(name)
            if safe != name:
                charset = None if safe.isascii() else "utf-8"
                part.set_param(param, safe, header=header, charset=charset)
                changed = True
    return msg.as_bytes() if changed else raw


def _param_text(part: Message, header: str, param: str) -> str | None:
    value = part.get_param(param, header=header)
    if not value or not isinstance(value, (str, tuple)):
        return None
    text = str(collapse_rfc2231_value(value))
    if "=?" in text:  # RFC 2047 encoded words, which many clients put in file names
        with contextlib.suppress(HeaderParseError, LookupError, UnicodeDecodeError):
            text = str(make_header(decode_header(text)))
    return text


@dataclass(frozen=True)
class Draft:
    """Everything an API send request says about the message's content."""

    sender: Mailbox
    subject: str
    to: Sequence[Mailbox] = ()
    cc: Sequence[Mailbox] = ()
    reply_to: Mailbox | None = None
    text: str | None = None
    html: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    attachments: Sequence[Attachment] = ()


def _has_control(text: str | bytes) -> bool:
    codes = text if isinstance(text, bytes) else map(ord, text)
    return any((c < 0x20 and c != 0x09) or c == 0x7F for c in codes)


def check_line(value: str) -> str:
    """A value that ends up in a header: no CR, LF or other control characters, not even
    inside RFC 2047 encoded words (the stdlib decodes those and writes them out raw:
    CVE-2024-6923, unfixed in this Python)."""
    if "\r" in value or "\n" in value:
        raise MimeError("header_injection", "must not contain CR or LF")
    if _has_control(value):
        raise MimeError("control_character", "must not contain control characters")
    for word in _ENCODED_WORD.findall(value):
        try:
            decoded = decode_header(word)
        except (HeaderParseError, ValueError):
            continue
        if any(_has_control(part) for part, _ in decoded if isinstance(part, bytes)):
            raise MimeError(
                "header_injection", "must not contain control characters, encoded or not"
            )
    return value


@functools.lru_cache(maxsize=4096)
def parse_mailbox(value: str) -> Mailbox:
    """`addr@domain` or `Display Name <addr@domain>` (internationalised addresses allowed).
    Remembered: a sender's From is the same in request after request."""
    check_line(value)
    value = value.strip()
    display_name = ""
    match = _NAME_ADDR.fullmatch(value)
    if match:
        display_name, value = match.group(1).strip(), match.group(2).strip()
        if len(display_name) >= 2 and display_name[0] == display_name[-1] == '"':
            display_name = re.sub(r"\\(.)", r"\1", display_name[1:-1])
        if len(display_name) > MAX_DISPLAY_NAME:
            raise MimeError(
                "invalid_address", f"display name longer than {MAX_DISPLAY_NAME} characters"
            )
    local_part, domain = _address(value)
    return Mailbox(local_part, domain, display_name)


def _validated(address: str) -> ValidatedEmail:
    # .test stays allowed: the RFC 2606 test domain that transport maps route locally.
    return validate_email(
        address, allow_smtputf8=True, check_deliverability=False, test_environment=True
    )


def _address(value: str) -> tuple[str, str]:
    """(local part, IDNA ASCII domain) of an address as email_validator finds them. A plain
    ASCII local part (which it takes as it is) needs only its domain checked, and a domain
    checked lately is not checked again: recipients differ, their domains mostly do not."""
    local, _, domain = value.partition("@")
    if (
        _ASCII_DOT_ATOM.match(local)
        and local.lower() not in CASE_INSENSITIVE_MAILBOX_NAMES
        and _ASCII_HOSTNAME.fullmatch(domain)
    ):
        domains = _domain(domain)
        # RFC 5321 §4.5.3.1.3 via email_validator's length checks, all three forms of it.
        longest = max(len(d.encode("utf-8")) for d in (domain, *domains)) if domains else 0
        if domains is not None and len(local) + 1 + longest <= 254:
            return local, domains[1]
    try:
        valid = _validated(value)
    except EmailNotValidError as exc:
        raise MimeError("invalid_address", str(exc)) from None
    return valid.local_part, valid.ascii_domain


@functools.lru_cache(maxsize=1024)
def _domain(domain: str) -> tuple[str, str] | None:
    """(Unicode, ASCII) forms of a valid domain; None for one email_validator refuses."""
    try:
        valid = _validated(f"x@{domain}")
    except EmailNotValidError:
        return None
    return valid.domain, valid.ascii_domain


def check_header(name: str, value: str) -> None:
    """A custom header the caller may set (RFC 5322 §3.6.8 name, one-line value)."""
    if not _FTEXT.fullmatch(name) or len(name) > MAX_HEADER_NAME:
        raise MimeError(
            "invalid_header_name",
            f"a header name is 1-{MAX_HEADER_NAME} printable ASCII characters without ':'",
        )
    lname = name.lower()
    why = RESERVED_HEADERS.get(lname) or next(
        (why for prefix, why in RESERVED_PREFIXES.items() if lname.startswith(prefix)), None
    )
    if why is not None:
        raise MimeError("reserved_header", f"the {name} header cannot be set: {why}")
    check_line(value)
    if len(value) > MAX_HEADER_VALUE:
        raise MimeError("header_too_long", f"a header value is at most {MAX_HEADER_VALUE} long")


def parse_content_type(value: str) -> tuple[str, str, dict[str, str]]:
    """(maintype, subtype, params) of an attachment's `type/subtype; name=value` content type."""
    match = _CONTENT_TYPE.fullmatch(value.strip())
    if not match:
        raise MimeError("invalid_content_type", "not a content type like `application/pdf`")
    maintype, subtype = match.group(1).lower(), match.group(2).lower()
    # RFC 2045 §6.4 and RFC 2046 §5.2.1: multipart and message parts may not be base64-encoded.
    if maintype in ("multipart", "message"):
        raise MimeError(
            "invalid_content_type", f"{maintype}/* cannot be an attachment's content type"
        )
    params: dict[str, str] = {}
    for name, raw in _PARAM.findall(match.group(3)):
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.lower()] = raw
    return maintype, subtype, params


def base64_size(n: int) -> int:
    """Octets that `n` bytes take as a base64 body part: 76-character lines and CRLFs."""
    chars = (n + 2) // 3 * 4
    return chars + (chars + 75) // 76 * 2


def build(draft: Draft) -> bytes:
    """The message as RFC 5322 bytes with CRLF line ends: text and html as
    multipart/alternative, attachments as multipart/mixed, never a Bcc header."""
    simple = _build_simple(draft)
    return simple if simple is not None else build_with_email_package(draft)


_ASCII_HEADERS = SMTP.clone(cte_type="7bit")
_UTF8_HEADERS = SMTPUTF8.clone(cte_type="7bit")


def _policy(draft: Draft) -> EmailPolicy[EmailMessage]:
    """Bodies are 7bit, quoted-printable or base64 (no 8BITMIME needed); headers are
    RFC 2047-encoded, unless an address needs SMTPUTF8 anyway (RFC 6532: UTF-8 headers)."""
    shown = [draft.sender, *draft.to, *draft.cc]
    if draft.reply_to is not None:
        shown.append(draft.reply_to)
    return _UTF8_HEADERS if any(m.needs_smtputf8 for m in shown) else _ASCII_HEADERS


def build_with_email_package(draft: Draft) -> bytes:
    """`build` by the email package: any message, headers folded and RFC 2047-encoded."""
    msg = EmailMessage(policy=_policy(draft))
    msg["From"] = draft.sender.header()
    if draft.to:
        msg["To"] = [m.header() for m in draft.to]
    if draft.cc:
        msg["Cc"] = [m.header() for m in draft.cc]
    if not draft.to and not draft.cc:
        # RFC 5322 §3.6.3: only Bcc recipients; an empty group says so (and spam filters
        # count a message without To against it).
        msg["To"] = "undisclosed-recipients:;"
    if draft.reply_to is not None:
        msg["Reply-To"] = draft.reply_to.header()
    msg["Subject"] = draft.subject
    for name, value in draft.headers:
        msg[name] = value
    if draft.text is not None:
        msg.set_content(draft.text)
        if draft.html is not None:
            msg.add_alternative(draft.html, subtype="html")
    elif draft.html is not None:
        msg.set_content(draft.html, subtype="html")
    else:
        msg.set_content("")
    for att in draft.attachments:
        if att.content_id is not None:
            # RFC 2392: Content-ID is a msg-id, `<id>`; RFC 2183 inline disposition.
            msg.add_attachment(
                att.data,
                att.maintype,
                att.subtype,
                filename=att.filename,
                params=att.params,
                disposition="inline",
                cid=f"<{att.content_id}>",
            )
            continue
        msg.add_attachment(
            att.data, att.maintype, att.subtype, filename=att.filename, params=att.params
        )
    _check_folding(msg)
    return msg.as_bytes()


# -- the simple build ---------------------------------------------------------------------------
# Most messages have short ASCII header fields, a text and/or html body and a few attachments
# with plain file names. For those `_build_simple` writes the very bytes the email package
# writes (its part layout, header order and body encodings; only the random MIME boundaries
# differ) without its policy machinery, which costs more than the rest of accepting the
# message. Anything else (a field to fold or to encode, RFC 2231 file names, attachment
# parameters, SMTPUTF8) returns None and goes to `build_with_email_package`.

_MAX_SIMPLE_LINE = 78  # the email package's max_line_length: longer fields are folded
# Printable ASCII, no RFC 2047 encoded word, no white space at either end: nothing to encode,
# decode or trim, and no CR or LF, so a field is one line by construction (this path's header
# injection guard; `_check_folding` guards the other).
_SIMPLE_VALUE = re.compile(r"(?!.*=\?)[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_SIMPLE_FILENAME = re.compile(r'(?!.*=\?)[^\s"\\](?:[\x20\x21\x23-\x5b\x5d-\x7e]*[^\s"\\])?')
_BASE64_LINE = 76  # RFC 2045 §6.8; 57 octets a line, as the email package writes them
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))
_MIME_VERSION = f"MIME-Version: 1.0{_LINESEP}"


def _field(name: str, value: str) -> str | None:
    line = f"{name}: {value}"
    if len(line) > _MAX_SIMPLE_LINE or not _SIMPLE_VALUE.fullmatch(value):
        return None
    return line + _LINESEP


def _folded(policy: EmailPolicy[EmailMessage], name: str, value: str | list[Address]) -> str | None:
    """A field as the email package writes it (folded, RFC 2047-encoded or, with SMTPUTF8,
    in UTF-8): its header object folded alone, not a whole message of them; None unless
    it is one field (see `_check_folding`) or if the email package fails on it."""
    try:
        folded = policy.fold(name, policy.header_factory(name, value))
    except Exception:  # the full build meets it again and fails as it always did
        return None
    return folded if _is_one_field(name, folded) else None


def _header(policy: EmailPolicy[EmailMessage], name: str, value: str) -> str | None:
    return _field(name, value) or _folded(policy, name, value)


def _mailboxes(
    policy: EmailPolicy[EmailMessage], name: str, boxes: Sequence[Mailbox]
) -> str | None:
    if not any(m.needs_smtputf8 or not m.display_name.isascii() for m in boxes):
        shown = [str(m.header()) for m in boxes]
        simple = _field(name, ", ".join(shown)) or _address_lines(name, shown)
        if simple is not None:
            return simple
    return _folded(policy, name, [m.header() for m in boxes])


def _address_lines(name: str, shown: list[str]) -> str | None:
    """A list of plain ASCII addresses too long for one line, folded after the commas as the
    email package folds it: as many whole addresses a line as fit in 78 characters. None
    near the edges where its folding has quirks (a list that would fit on a line of its
    own, an address that would fit on no line)."""
    if (
        sum(map(len, shown)) + 2 * (len(shown) - 1) <= _MAX_SIMPLE_LINE
        or not all(map(_SIMPLE_VALUE.fullmatch, shown))
        or max(map(len, shown)) > _MAX_SIMPLE_LINE - 4
    ):
        return None
    lines = [f"{name}: {shown[0]}"]
    if len(lines[0]) > _MAX_SIMPLE_LINE - 1:
        return None
    for address in shown[1:]:
        if len(lines[-1]) + 2 + len(address) <= _MAX_SIMPLE_LINE:
            lines[-1] += f", {address}"
        else:
            lines[-1] += ","
            lines.append(f" {address}")
    return _LINESEP.join(lines) + _LINESEP


@dataclass(frozen=True)
class _Part:
    """A body part: its Content-* fields (CRLF-terminated) and its encoded body."""

    fields: str
    body: str

    def text(self, mime_version: bool = False) -> str:
        # The email package gives every part it adds a MIME-Version field of its own.
        return f"{self.fields}{_MIME_VERSION if mime_version else ''}{_LINESEP}{self.body}"


def _text_part(text: str, subtype: str) -> _Part | None:
    """A text part encoded as the email package's contentmanager chooses: 7bit when every
    line is short ASCII, else quoted-printable or base64, whichever the first lines make
    shorter."""
    try:
        lines = text.encode("utf-8").splitlines()
    except UnicodeEncodeError:
        return None
    if max(map(len, lines), default=0) <= _MAX_SIMPLE_LINE and all(map(bytes.isascii, lines)):
        cte, body = "7bit", b"\r\n".join(lines).decode("ascii") + _LINESEP
    else:
        sniff = b"\r\n".join(lines[:10]) + b"\r\n"
        sniff_qp = _quoted_printable(sniff.decode("latin-1"))
        if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
            cte, body = "base64", _base64_body(b"\r\n".join(lines) + b"\r\n")
        elif len(lines) <= 10:
            cte, body = "quoted-printable", sniff_qp.replace("\n", _LINESEP)
        else:
            normal = (b"\n".join(lines) + b"\n").decode("latin-1")
            encoded = _quoted_printable(normal)
            cte, body = "quoted-printable", encoded.replace("\n", _LINESEP)
    fields = (
        f'Content-Type: text/{subtype}; charset="utf-8"{_LINESEP}'
        f"Content-Transfer-Encoding: {cte}{_LINESEP}"
    )
    return _Part(fields, body)


# RFC 2045 §6.7: octets other than printable ASCII (bar "="), space, tab and line breaks are
# quoted. One table for any text; for ASCII text "=" and a regex for the few controls are faster.
_QP_TABLE = [
    chr(c) if c in b"\t\n\r" or (0x20 <= c <= 0x7E and c != 0x3D) else f"={c:02X}"
    for c in range(256)
]
_QP_QUOTED = re.compile(r"[^\t\n\r\x20-\x7e]+")


def _qp_quote(match: re.Match[str]) -> str:
    return "=" + match.group().encode("latin-1").hex("=").upper()


def _quoted_printable(body: str) -> str:
    """`email.quoprimime.body_encode(body, 78)`, the encoder the email package uses, with its
    character-by-character translate skipped for ASCII text (a fraction of the cost for the
    long lines of HTML); the line wrapping is its own, step for step. `body` is text decoded
    as Latin-1; lines end in LF alone (every CR or LF of `body` ends a line)."""
    if not body:
        return body
    if body.isascii():
        body = _QP_QUOTED.sub(_qp_quote, body.replace("=", "=3D"))
    else:
        body = body.translate(_QP_TABLE)
    last = _MAX_SIMPLE_LINE - 1  # room for the "=" of a soft line break
    encoded: list[str] = []
    append = encoded.append
    for line in body.splitlines():
        start = 0
        laststart = len(line) - 1 - _MAX_SIMPLE_LINE
        while start <= laststart:
            stop = start + last
            if line[stop - 2] == "=":  # never split an =XX escape
                append(line[start : stop - 1])
                start = stop - 2
            elif line[stop - 1] == "=":
                append(line[start:stop])
                start = stop - 1
            else:
                append(line[start:stop] + "=")
                start = stop
        if line and line[-1] in " \t":  # RFC 2045 §6.7 (3): white space ending a line is quoted
            room = start - laststart
            if room >= 3:
                end = f"={ord(line[-1]):02X}"
            elif room == 2:
                end = line[-1] + "=\n"
            else:
                end = f"=\n={ord(line[-1]):02X}"
            append(line[start:-1] + end)
        else:
            append(line[start:])
    if body[-1] in "\r\n":
        append("")
    return "\n".join(encoded)


def _base64_body(data: bytes) -> str:
    """RFC 2045 §6.8 base64 in lines of 76 characters, each ending in CRLF."""
    encoded = binascii.b2a_base64(data, newline=False).decode("ascii")
    return "".join(
        encoded[i : i + _BASE64_LINE] + _LINESEP for i in range(0, len(encoded), _BASE64_LINE)
    )


def _attachment_part(att: Attachment) -> _Part | None:
    if att.params or att.content_id is not None or not _SIMPLE_FILENAME.fullmatch(att.filename):
        return None
    content_type = _field("Content-Type", f"{att.maintype}/{att.subtype}")
    disposition = _field("Content-Disposition", f'attachment; filename="{att.filename}"')
    if content_type is None or disposition is None:
        return None
    fields = f"{content_type}Content-Transfer-Encoding: base64{_LINESEP}{disposition}"
    return _Part(fields, _base64_body(att.data))


def _multipart(subtype: str, parts: Sequence[str]) -> _Part | None:
    """A multipart of the parts' texts, with a random boundary as the email package draws
    it; None in the one-in-a-lifetime case that a part holds the boundary."""
    boundary = f"{'=' * 15}{random.randrange(sys.maxsize):0{_BOUNDARY_DIGITS}d}=="
    delimiter = f"--{boundary}"
    if any(delimiter in part for part in parts):
        return None
    separator = f"{_LINESEP}{delimiter}{_LINESEP}"
    body = f"{delimiter}{_LINESEP}{separator.join(parts)}{_LINESEP}{delimiter}--{_LINESEP}"
    field = f'Content-Type: multipart/{subtype}; boundary="{boundary}"'
    if len(field) > _MAX_SIMPLE_LINE:  # folded before the parameter, as the email package does
        field = f'Content-Type: multipart/{subtype};{_LINESEP} boundary="{boundary}"'
    return _Part(field + _LINESEP, body)


def _content(draft: Draft) -> _Part | None:
    """The message's content: one text part, or text and html as multipart/alternative."""
    if draft.text is not None and draft.html is not None:
        plain, rich = _text_part(draft.text, "plain"), _text_part(draft.html, "html")
        if plain is None or rich is None:
            return None
        return _multipart("alternative", [plain.text(), rich.text(mime_version=True)])
    if draft.text is not None:
        return _text_part(draft.text, "plain")
    if draft.html is not None:
        return _text_part(draft.html, "html")
    return None


def _build_simple(draft: Draft) -> bytes | None:
    """`build` for the common shapes, byte for byte as the email package writes them (bar
    the random MIME boundaries); None for anything else."""
    policy = _policy(draft)
    fields = [_mailboxes(policy, "From", [draft.sender])]
    if draft.to:
        fields.append(_mailboxes(policy, "To", draft.to))
    if draft.cc:
        fields.append(_mailboxes(policy, "Cc", draft.cc))
    if not draft.to and not draft.cc:
        fields.append(f"To: undisclosed-recipients:;{_LINESEP}")
    if draft.reply_to is not None:
        fields.append(_mailboxes(policy, "Reply-To", [draft.reply_to]))
    fields.append(_header(policy, "Subject", draft.subject))
    fields.extend(_header(policy, name, value) for name, value in draft.headers)
    content = _content(draft)
    if content is None or None in fields:
        return None
    head = "".join(f for f in fields if f is not None)
    multipart = content.fields.startswith("Content-Type: multipart/")
    if draft.attachments:
        parts = [content.text()]
        for att in draft.attachments:
            part = _attachment_part(att)
            if part is None:
                return None
            parts.append(part.text(mime_version=True))
        mixed = _multipart("mixed", parts)
        if mixed is None:
            return None
        content, multipart = mixed, True
    # A single part carries MIME-Version after its Content-* fields, a multipart before them.
    if multipart:
        message = f"{head}{_MIME_VERSION}{content.text()}"
    else:
        message = f"{head}{content.text(mime_version=True)}"
    return message.encode("utf-8" if policy.utf8 else "ascii")


def _check_folding(msg: EmailMessage) -> None:
    """Every header, as the generator will write it, is one field: continuation lines start
    with white space (RFC 5322 §2.2.3) and no CR or LF stands alone. The last guard against
    header injection, whatever the stdlib decoded on the way."""
    for part in msg.walk():
        for name, value in part.raw_items():
            if not _is_one_field(name, part.policy.fold(name, value)):
                raise MimeError("header_injection", f"the {name} header would not be one field")


def _is_one_field(name: str, folded: str) -> bool:
    lines = folded.split(_LINESEP)
    return not (
        lines[-1] != ""
        or not lines[0].lower().startswith(name.lower() + ":")
        or any(line[:1] not in (" ", "\t") for line in lines[1:-1])
        or any("\r" in line or "\n" in line for line in lines)
    )
