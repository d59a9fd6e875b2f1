"""Signed cookie values and CSRF tokens for the web UI: HMAC-SHA256, pure functions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

MAC_BYTES = 32


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose only, so a value signed for one use is never valid for another."""
    return hmac.new(secret, b"postbode.web." + purpose.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, payload: dict[str, Any], now: float) -> str:
    """`payload` (JSON-able) with its issue time, as `<base64 json>.<base64 mac>`."""
    body = _b64(json.dumps({**payload, "iat": int(now)}, separators=(",", ":")).encode())
    mac = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def unsign(key: bytes, value: str | None, max_age: float, now: float) -> dict[str, Any] | None:
    """The payload of a value `sign` made with `key` at most `max_age` seconds ago, else None."""
    if not value or len(value) > 4096 or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    try:
        given = _unb64(mac)
        expected = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            return None
        payload = json.loads(_unb64(body))
    except (ValueError, UnicodeError):  # binascii.Error and JSONDecodeError are ValueErrors
        return None
    if not isinstance(payload, dict):
        return None
    issued = payload.get("iat")
    if not isinstance(issued, int) or not now - max_age <= issued <= now + 60:
        return None
    return payload


def new_nonce() -> str:
    """A random value a browser's session (or pre-login visit) is known by."""
    return secrets.token_urlsafe(18)


def csrf_token(key: bytes, nonce: str) -> str:
    """The CSRF token of a session: bound to its nonce, so another session's token fails."""
    return _b64(hmac.new(key, b"csrf:" + nonce.encode(), hashlib.sha256).digest())


def csrf_ok(key: bytes, nonce: str, token: str | None) -> bool:
    """Whether `token` is the CSRF token of the session known by `nonce`."""
    if not token or not nonce:
        return False
    return hmac.compare_digest(token.encode(), csrf_token(key, nonce).encode())


def fingerprint(password_hash: str) -> str:
    """A short digest of a user's password hash: a session made before a password change
    carries the old one and stops working."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]
