"""Signed tracking tokens: which delivery an open, click or unsubscribe is about, and for a
click the URL it leads to, so the endpoints never redirect anywhere the message did not link."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAC_BYTES", "MAX_TOKEN_LENGTH", "Token", "decode", "derive_key", "encode"]

Kind = Literal["open", "click", "unsubscribe"]

VERSION = 1
MAC_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 §5: at least half the output)
MAX_TOKEN_LENGTH = 8192  # characters; longer paths are refused before any decoding
_KINDS: dict[Kind, bytes] = {"open": b"o", "click": b"c", "unsubscribe": b"u"}
_BY_CODE: dict[bytes, Kind] = {v: k for k, v in _KINDS.items()}
_LINKS = struct.Struct(">HH")  # link index, links in the message


@dataclass(frozen=True)
class Token:
    """What a tracking URL says, once its MAC checks out."""

    kind: Kind
    delivery_id: uuid.UUID
    url: str | None = None  # clicks: where to redirect
    link: int = 0  # clicks: which rewritten link of the message (0-based)
    links: int = 0  # clicks: how many links the message had rewritten


def derive_key(secret_key: bytes) -> bytes:
    """The token key, derived from the installation's secret key for this one purpose."""
    return hmac.new(secret_key, b"postbode/tracking-token/v1", hashlib.sha256).digest()


def encode(token: Token, key: bytes) -> str:
    """base64url (RFC 4648 §5, unpadded) of version, kind, delivery id, [link, links, URL],
    and a truncated HMAC-SHA256 of all that."""
    payload = bytes([VERSION]) + _KINDS[token.kind] + token.delivery_id.bytes
    if token.kind == "click":
        if token.url is None:
            raise ValueError("a click token needs a URL")
        payload += _LINKS.pack(min(token.link, 0xFFFF), min(token.links, 0xFFFF))
        payload += token.url.encode("utf-8")
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")


def decode(text: str, key: bytes, kind: Kind | None = None) -> Token | None:
    """The token, or None when it is malformed, forged, altered, or (given `kind`) of
    another kind: a caller never learns which."""
    if not text or len(text) > MAX_TOKEN_LENGTH:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) < 2 + 16 + MAC_BYTES:
        return None
    payload, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    expected = hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]
    if not hmac.compare_digest(mac, expected) or payload[0] != VERSION:
        return None
    found = _BY_CODE.get(payload[1:2])
    if found is None or (kind is not None and found != kind):
        return None
    delivery_id = uuid.UUID(bytes=payload[2:18])
    if found != "click":
        return Token(found, delivery_id) if len(payload) == 18 else None
    if len(payload) < 18 + _LINKS.size:
        return None
    link, links = _LINKS.unpack_from(payload, 18)
    try:
        url = payload[18 + _LINKS.size :].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Token("click", delivery_id, url, link, links)
