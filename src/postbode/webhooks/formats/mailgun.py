"""Mailgun's webhook payloads: `{"signature": {…}, "event-data": {…}}` with Mailgun's event
names and `severity`/`reason` for failures, signed with the endpoint's signing key."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

from .common import data, message_fields, reply

# Postbode's event type -> (Mailgun's event, severity, reason).
EVENTS: dict[str, tuple[str, str | None, str | None]] = {
    "delivery.queued": ("accepted", None, None),
    "delivery.delivered": ("delivered", None, None),
    "delivery.deferred": ("failed", "temporary", "generic"),
    "delivery.bounced": ("failed", "permanent", "bounce"),
    "delivery.failed": ("failed", "permanent", "generic"),
    "delivery.suppressed": ("failed", "permanent", "suppress-bounce"),
    "message.opened": ("opened", None, None),
    "message.clicked": ("clicked", None, None),
    "message.complained": ("complained", None, None),
    "message.unsubscribed": ("unsubscribed", None, None),
}
EVENT_TYPES = frozenset(EVENTS)
TOKEN_BYTES = 25  # Mailgun's tokens are 50 hexadecimal characters


def user_variables(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Metadata as Mailgun reports `v:` variables: a value that is a JSON object or array
    is decoded (Mailgun's way to attach structured data); anything else stays a string."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        out[key] = value
        if value[:1] in ("{", "["):
            with contextlib.suppress(ValueError):
                out[key] = json.loads(value)
    return out


def event_data(event: Mapping[Any, Any], message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The `event-data` object of one event; KeyError for an event Mailgun has no name for."""
    name, severity, reason = EVENTS[event["type"]]
    m = message_fields(message)
    found = data(event)
    recipient = event["recipient"] or ""
    out: dict[str, Any] = {
        "id": str(event["id"]),
        "timestamp": event["created_at"].timestamp(),
        "log-level": "error"
        if name == "failed" and severity == "permanent"
        else ("warn" if name in ("failed", "complained") else "info"),
        "event": name,
        "recipient": recipient,
        "recipient-domain": recipient.rpartition("@")[2],
        "tags": [m["tag"]] if m["tag"] else [],
        "user-variables": user_variables(m["metadata"]),
        "message": {
            # Mailgun reports the Message-ID without its angle brackets.
            "headers": {
                "message-id": m["header"].strip().strip("<>"),
                "from": m["from"],
                "to": recipient,
                "subject": m["subject"],
            },
        },
    }
    if severity is not None:
        out["severity"] = severity
    if reason is not None:
        out["reason"] = reason
    if name in ("delivered", "failed"):
        code = found.get("status") or ""
        status: dict[str, Any] = {
            "message": reply(event),
            "description": reply(event),
            "attempt-no": found.get("attempt", 1),
            "mx-host": found.get("mx") or "",
            "enhanced-code": code,
            "code": 250 if name == "delivered" else (550 if severity == "permanent" else 451),
        }
        if event["type"] == "delivery.bounced":
            status["bounce-type"] = "hard" if found.get("hard") else "soft"
            status["bounce-classification"] = found.get("category") or "unknown"
        out["delivery-status"] = status
    if name in ("opened", "clicked"):
        out["client-info"] = {"user-agent": found.get("user_agent") or ""}
        out["ip"] = found.get("ip") or ""
        if name == "clicked":
            out["url"] = found.get("url") or ""
    return out


def signature(signing_key: str, timestamp: int, token: str | None = None) -> dict[str, str]:
    """Mailgun's signature block: HMAC-SHA256 of timestamp + token with the signing key,
    in hexadecimal."""
    token = token or secrets.token_hex(TOKEN_BYTES)
    digest = hmac.new(
        signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256
    ).hexdigest()
    return {"timestamp": str(timestamp), "token": token, "signature": digest}


def format(event: Mapping[Any, Any], message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The payload without its signature block (`render` adds it, with the key)."""
    return {"event-data": event_data(event, message)}
