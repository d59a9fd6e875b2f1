"""Signed links to inbound attachments too large to travel in the hand-off: the URL names the
message, the attachment's index and an expiry, and carries an HMAC of them, so the web layer
serves it without a login and nobody can guess another one."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

from postbode.config import Settings
from postbode.store.engine import Store, secret_key

PATH = "/inbound/attachments"


def derive_key(secret: bytes) -> bytes:
    """The link key, derived from the installation's secret key for this one purpose."""
    return hmac.new(secret, b"postbode/inbound-attachment/v1", hashlib.sha256).digest()


def signature(key: bytes, inbound_id: uuid.UUID, index: int, expires: int) -> str:
    message = f"{inbound_id}.{index}.{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class AttachmentLinks:
    """Makes and checks attachment links."""

    key: bytes
    base_url: str
    lifetime: int  # seconds

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> AttachmentLinks:
        return cls(
            derive_key(secret_key(settings, store)),
            settings.inbound_attachment_url.rstrip("/"),
            settings.inbound_attachment_link_seconds,
        )

    def url(self, inbound_id: uuid.UUID, index: int, *, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime)
        query = urlencode(
            {"expires": expires, "signature": signature(self.key, inbound_id, index, expires)}
        )
        return f"{self.base_url}{PATH}/{inbound_id}/{index}?{query}"

    def valid(
        self,
        inbound_id: uuid.UUID,
        index: int,
        expires: int,
        given: str,
        *,
        now: float | None = None,
    ) -> bool:
        if expires < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(signature(self.key, inbound_id, index, expires), given)
