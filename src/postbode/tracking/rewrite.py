"""The `track` step of outgoing mail: open pixel, click links through signed per-delivery tokens,
and List-Unsubscribe for broadcast mail (RFC 8058), leaving the MIME structure as it was."""

from __future__ import annotations

import email
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email import base64mime, quoprimime
from email.message import Message
from email.policy import compat32
from functools import lru_cache
from html import escape
from html.parser import HTMLParser
from typing import Any, Protocol
from urllib.parse import urlsplit

from postbode.config import Settings
from postbode.store.engine import Store, secret_key
from postbode.tracking import tokens
from postbode.tracking.tokens import Token

log = logging.getLogger(__name__)

MAX_DEPTH = 20  # multipart nesting followed at most
MAX_LINE = 998  # RFC 5322 §2.1.1: a line is at most 998 octets before CRLF
NOTRACK_ATTRIBUTE = "data-postbode-notrack"
# Links whose URL or text says this are unsubscribe links: never rewritten, so the sender's
# own unsubscribe keeps working and no scanner "clicks" a recipient off a list.
UNSUBSCRIBE_WORDS = (
    "unsubscribe",
    "opt-out",
    "optout",
    "opt out",
    "afmelden",
    "uitschrijven",
    "abmelden",
    "abbestellen",
    "désabonner",
    "desabonner",
    "désinscri",
    "desinscri",
    "darse de baja",
    "disiscriviti",
)
# Template placeholders an ESP fills in later ({{unsubscribe}}, *|UNSUB|*, %unsubscribe_url%,
# [unsubscribe]): not a URL yet, so not ours to rewrite.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|%7b%7b|\*\||\|\*|%[a-z_]+%|\[[a-z_]+\]", re.IGNORECASE)
_HREF = re.compile(r"""(?<=[\s"'/])(href\s*=\s*)("[^"]*"|'[^']*'|[^\s"'=<>`]+)""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_ANGLE_URL = re.compile(r"<([^<>]+)>")


class TrackableJob(Protocol):
    """What the step needs of an outgoing delivery (delivery/outgoing.py's Job)."""

    row: Any  # the deliveries row: id
    message: Any  # the messages row: stream, track_opens, track_clicks
    raw: bytes


@dataclass(frozen=True)
class Options:
    """What to do to one delivery's copy of a message."""

    base_url: str  # settings.tracking_url, without a trailing slash
    key: bytes  # tokens.derive_key(secret_key)
    delivery_id: uuid.UUID
    opens: bool = False
    clicks: bool = False
    unsubscribe: bool = False  # add List-Unsubscribe and List-Unsubscribe-Post

    def url(self, kind: str, token: Token) -> str:
        path = {"open": "o", "click": "c", "unsubscribe": "u"}[kind]
        return f"{self.base_url}/t/{path}/{tokens.encode(token, self.key)}"


# -- the step ------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _key(store: Store, configured: str) -> bytes:
    return tokens.derive_key(secret_key(Settings(secret_key=configured), store))


def tracking_key(settings: Settings, store: Store) -> bytes:
    """The key tracking tokens are signed with (derived from the installation's secret key)."""
    return _key(store, settings.secret_key.get_secret_value())


def track(settings: Settings, store: Store, job: TrackableJob) -> None:
    """Rewrite the delivery's copy of the message for open and click tracking, and give
    broadcast mail its one-click unsubscribe headers. Runs before DKIM signing, so the
    signature covers what the recipient gets. A message that cannot be rewritten goes out
    as it is (logged), never not at all."""
    msg = job.message
    broadcast = msg.stream == "broadcast"
    if not (msg.track_opens or msg.track_clicks or broadcast) or not job.raw:
        return
    options = Options(
        base_url=settings.tracking_url.rstrip("/"),
        key=tracking_key(settings, store),
        delivery_id=job.row.id,
        opens=bool(msg.track_opens),
        clicks=bool(msg.track_clicks),
        unsubscribe=broadcast,
    )
    try:
        job.raw = rewrite_message(job.raw, options)
    except Exception:
        log.exception("tracking rewrite of delivery %s failed; sent untracked", job.row.id)


# -- messages ------------------------------------------------------------------------------------


def rewrite_message(raw: bytes, options: Options) -> bytes:
    """The message with tracking applied; parts that are not HTML bodies stay byte for byte."""
    head, body = _split(raw)
    headers = _parse_headers(head)
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    skip = {u.strip() for u in _ANGLE_URL.findall(str(headers.get("List-Unsubscribe", "")))}
    if options.unsubscribe and headers.get("List-Unsubscribe") is None:
        url = options.url("unsubscribe", Token("unsubscribe", options.delivery_id))
        # RFC 8058 §3.1: an HTTPS URI in List-Unsubscribe and this exact List-Unsubscribe-Post.
        head += b"List-Unsubscribe: <" + url.encode("ascii") + b">" + eol
        head += b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" + eol
        skip.add(url)
    if options.opens or options.clicks:
        state = _State(options, skip)
        new = _rewrite_entity(head, body, state, 0)
        if new is not None:
            head, body = new
    return head + body


@dataclass
class _State:
    options: Options
    skip: set[str]
    pixel_placed: bool = False  # one pixel per message: one view, one open


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """(header block with its last line end, the blank line and the body) of an entity."""
    if entity.startswith((b"\r\n", b"\n")):
        return b"", entity  # no header fields (RFC 2045 §5.2: text/plain by default)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = entity.find(sep)
        if i != -1:
            cut = i + len(sep) // 2
            return entity[:cut], entity[cut:]
    return entity, b""


def _parse_headers(head: bytes) -> Message:
    return email.message_from_bytes(head + b"\r\n", policy=compat32)


def _rewrite_entity(
    head: bytes, body: bytes, state: _State, depth: int
) -> tuple[bytes, bytes] | None:
    """The entity's new (head, body), or None when nothing in it changed."""
    headers = _parse_headers(head)
    ctype = headers.get_content_type()
    if headers.get_content_disposition() == "attachment":
        return None
    if ctype.startswith("multipart/"):
        boundary = headers.get_boundary()
        if not boundary or depth >= MAX_DEPTH:
            return None
        new_body = _rewrite_multipart(body, boundary.encode("ascii", "replace"), state, depth + 1)
        return None if new_body is None else (head, new_body)
    if ctype == "text/html":
        return _rewrite_html_part(head, body, headers, state)
    return None  # text/plain, images, message/rfc822 (a forwarded message is not ours) …


def _rewrite_multipart(body: bytes, boundary: bytes, state: _State, depth: int) -> bytes | None:
    # RFC 2046 §5.1.1: a delimiter line is "--" boundary (and "--" when it closes) at the start
    # of a line; the line end before it belongs to the delimiter, not to the part.
    delimiter = re.compile(rb"(?:\A|(?<=\n))--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            end = match.start()
            if body[:end].endswith(b"\r\n"):
                end -= 2
            elif body[:end].endswith(b"\n"):
                end -= 1
            spans.append((start, max(start, end)))
        if match.group(1):  # the close delimiter: the rest is the epilogue
            start = None
            break
        start = match.end()
    changed = False
    out = body
    for begin, end in reversed(spans):
        part_head, part_body = _split(body[begin:end])
        new = _rewrite_entity(part_head, part_body, state, depth)
        if new is not None:
            out = out[:begin] + new[0] + new[1] + out[end:]
            changed = True
    return out if changed else None


def _rewrite_html_part(
    head: bytes, body: bytes, headers: Message, state: _State
) -> tuple[bytes, bytes] | None:
    """Decode the part (the email package undoes its transfer encoding), rewrite the HTML,
    and encode it again the same way, or as quoted-printable when lines grew too long."""
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    charset = headers.get_content_charset() or "us-ascii"
    try:
        if "<".encode(charset) != b"<":  # UTF-16 and the like: not ours to touch
            return None
    except LookupError:
        return None
    eol = "\r\n" if b"\r\n" in head + body else "\n"
    blank = b"\r\n" if body.startswith(b"\r\n") else b"\n" if body.startswith(b"\n") else b""
    # The part's own headers tell the email package how to undo the transfer encoding.
    carrier = email.message_from_bytes(head + b"\r\n" + body[len(blank) :], policy=compat32)
    decoded = carrier.get_payload(decode=True)
    if not isinstance(decoded, bytes):
        return None
    text = decoded.decode(charset, "surrogateescape")
    pixel = state.options.opens and not state.pixel_placed
    new_text = rewrite_html(text, state.options, state.skip, pixel=pixel)
    state.pixel_placed |= pixel
    if new_text == text:
        return None
    new_data = new_text.encode(charset, "surrogateescape")
    if cte == "base64":
        encoded = base64mime.body_encode(new_data, 76, eol).encode("ascii")
    elif cte == "quoted-printable":
        encoded = quoprimime.body_encode(new_data.decode("latin-1"), 76, eol).encode("latin-1")
    else:
        encoded = new_data
        if any(len(line) > MAX_LINE for line in new_data.splitlines()):
            # 7bit and 8bit forbid long lines (RFC 2045 §2.7, §2.8): switch to quoted-printable.
            encoded = quoprimime.body_encode(new_data.decode("latin-1"), 76, eol).encode("latin-1")
            head = _set_transfer_encoding(head, "quoted-printable", eol.encode())
    return head, blank + encoded


def _set_transfer_encoding(head: bytes, value: str, eol: bytes) -> bytes:
    kept: list[bytes] = []
    skipping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and skipping:
            continue  # a continuation of the field being replaced (RFC 5322 §2.2.3)
        skipping = line.lower().startswith(b"content-transfer-encoding:")
        if not skipping:
            kept.append(line)
    return b"".join(kept) + b"Content-Transfer-Encoding: " + value.encode("ascii") + eol


# -- HTML ------------------------------------------------------------------------------------------


@dataclass
class _Anchor:
    offset: int  # where the start tag begins in the text
    tag_text: str  # the start tag as written
    href: str | None
    notrack: bool
    text: list[str] = field(default_factory=list)


class _AnchorFinder(HTMLParser):
    """Finds <a> and <area> start tags (with position, raw text, href, link text)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[_Anchor] = []
        self._open: _Anchor | None = None
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("a", "area"):
            return
        tag_text = self.get_starttag_text() or ""
        line, column = self.getpos()
        names = {name for name, _ in attrs}
        href = next((value for name, value in attrs if name == "href"), None)
        anchor = _Anchor(
            self._line_starts[line - 1] + column, tag_text, href, NOTRACK_ATTRIBUTE in names
        )
        self.anchors.append(anchor)
        self._open = anchor if tag == "a" else None

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open.text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._open = None


def trackable(
    href: str, link_text: str, options: Options, skip: set[str] | frozenset[str] = frozenset()
) -> bool:
    """Whether a link is rewritten: absolute http(s) URLs only, never unsubscribe links, list
    unsubscribe targets, template placeholders or Postbode's own tracking URLs."""
    url = href.strip()
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return False
    if scheme not in ("http", "https") or url in skip:
        return False
    if url.startswith(options.base_url + "/t/") or _PLACEHOLDER.search(url):
        return False
    haystack = (url + " " + link_text).lower()
    return not any(word in haystack for word in UNSUBSCRIBE_WORDS)


def _replace_value(quoted: str) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return match.group(1) + quoted

    return replace


def rewrite_html(
    text: str,
    options: Options,
    skip: set[str] | frozenset[str] = frozenset(),
    *,
    pixel: bool = True,
) -> str:
    """The HTML with its trackable links rewritten and (with `pixel` and options.opens) the
    open pixel added before </body>, or at the end when there is none."""
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in the text
    if options.clicks:
        finder = _AnchorFinder(text)
        finder.feed(text)
        finder.close()
        chosen = [
            a
            for a in finder.anchors
            if a.href is not None
            and not a.notrack
            and text.startswith(a.tag_text, a.offset)
            and trackable(a.href, "".join(a.text), options, skip)
        ]
        # Links are numbered by distinct URL, so "every link clicked" means every URL.
        urls = list(dict.fromkeys(a.href.strip() for a in chosen if a.href is not None))
        for anchor in chosen:
            assert anchor.href is not None
            url = anchor.href.strip()
            token = Token("click", options.delivery_id, url, urls.index(url), len(urls))
            quoted = '"' + escape(options.url("click", token)) + '"'
            new_tag = _HREF.sub(_replace_value(quoted), anchor.tag_text, count=1)
            edits.append((anchor.offset, anchor.offset + len(anchor.tag_text), new_tag))
    if options.opens and pixel:
        src = escape(options.url("open", Token("open", options.delivery_id)))
        img = (
            f'<img src="{src}" width="1" height="1" alt="" '
            'style="display:block;width:1px;height:1px;border:0;" />'
        )
        ends = list(_BODY_END.finditer(text))
        at = ends[-1].start() if ends else len(text)
        edits.append((at, at, img))
    out = text
    for start, end, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + replacement + out[end:]
    return out


__all__ = [
    "NOTRACK_ATTRIBUTE",
    "UNSUBSCRIBE_WORDS",
    "Options",
    "rewrite_html",
    "rewrite_message",
    "track",
    "trackable",
    "tracking_key",
]
