"""Builds the RFC 5322 message of an API send request, and checks its addresses and headers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8

from email_validator import EmailNotValidError, validate_email

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


def parse_mailbox(value: str) -> Mailbox:
    """`addr@domain` or `Display Name <addr@domain>` (internationalised addresses allowed)."""
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
    try:
        # .test stays allowed: the RFC 2606 test domain that transport maps route locally.
        valid = validate_email(
            value, allow_smtputf8=True, check_deliverability=False, test_environment=True
        )
    except EmailNotValidError as exc:
        raise MimeError("invalid_address", str(exc)) from None
    return Mailbox(valid.local_part, valid.ascii_domain, display_name)


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
    shown = [draft.sender, *draft.to, *draft.cc]
    if draft.reply_to is not None:
        shown.append(draft.reply_to)
    # Bodies are 7bit, quoted-printable or base64 (no 8BITMIME needed); headers are
    # RFC 2047-encoded, unless an address needs SMTPUTF8 anyway (RFC 6532: UTF-8 headers).
    policy = SMTPUTF8 if any(m.needs_smtputf8 for m in shown) else SMTP
    msg = EmailMessage(policy=policy.clone(cte_type="7bit"))
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
        msg.add_attachment(
            att.data, att.maintype, att.subtype, filename=att.filename, params=att.params
        )
    _check_folding(msg)
    return msg.as_bytes()


def _check_folding(msg: EmailMessage) -> None:
    """Every header, as the generator will write it, is one field: continuation lines start
    with white space (RFC 5322 §2.2.3) and no CR or LF stands alone. The last guard against
    header injection, whatever the stdlib decoded on the way."""
    for part in msg.walk():
        for name, value in part.raw_items():
            folded = part.policy.fold(name, value)
            lines = folded.split(_LINESEP)
            if (
                lines[-1] != ""
                or not lines[0].lower().startswith(name.lower() + ":")
                or any(line[:1] not in (" ", "\t") for line in lines[1:-1])
                or any("\r" in line or "\n" in line for line in lines)
            ):
                raise MimeError("header_injection", f"the {name} header would not be one field")
