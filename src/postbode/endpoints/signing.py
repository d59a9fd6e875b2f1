"""Webhook signatures in the Standard Webhooks scheme: secrets, signing, verifying, rotation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES = 24
TOLERANCE_SECONDS = 300  # Standard Webhooks: a receiver refuses timestamps older or newer

__all__ = [
    "SECRET_PREFIX",
    "SignatureError",
    "generate_secret",
    "secret_bytes",
    "sign",
    "signed_headers",
    "verify",
]


class SignatureError(ValueError):
    """A webhook whose signature, timestamp or secret does not check out."""


def generate_secret() -> str:
    """A new endpoint secret: `whsec_` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: the base64-decoded part after `whsec_`."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the secret is not base64 after whsec_") from None
    if not key:
        raise SignatureError("the secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    to_sign = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(secret_bytes(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signed_headers(
    secrets_in_force: Iterable[str], msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The webhook-id, webhook-timestamp and webhook-signature headers of one request.

    During a rotation the signature header carries one signature per secret in force,
    space-separated (`v1,<new> v1,<previous>`), so receivers on either secret accept it."""
    ts = int(time.time()) if timestamp is None else timestamp
    signatures = " ".join(sign(s, msg_id, ts, body) for s in secrets_in_force)
    if not signatures:
        raise SignatureError("no secret to sign with")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signatures,
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> None:
    """Raise SignatureError unless one `v1` signature in the headers is `secret`'s and the
    timestamp is within `tolerance` seconds of `now` (what a receiver checks)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    given = lowered.get("webhook-signature", "")
    if not (msg_id and stamp and given):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - ts) > tolerance:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, ts, body).encode()
    for candidate in given.split(" "):
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no matching signature")
