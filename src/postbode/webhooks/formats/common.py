"""What the provider formats share: times, the message's fields, bounce facts of an event."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def iso(at: datetime) -> str:
    """An instant as RFC 3339 in UTC with a `Z` (RFC 3339 §5.6)."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def epoch(at: datetime) -> int:
    return int(at.timestamp())


def message_fields(message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The message's fields the formats report, with empty values for an event whose message
    is gone (purged) or was never there."""
    if message is None:
        return {
            "id": "",
            "header": "",
            "tag": None,
            "metadata": {},
            "stream": "transactional",
            "from": "",
            "subject": "",
        }
    return {
        "id": str(message["id"]),
        "header": message["message_id_header"],
        "tag": message["tag"],
        "metadata": dict(message["metadata"] or {}),
        "stream": message["stream"],
        "from": message.get("from_header") or message.get("mail_from") or "",
        "subject": message.get("subject") or "",
    }


def data(event: Mapping[Any, Any]) -> dict[str, Any]:
    return dict(event["data"] or {})


def short_id(event: Mapping[Any, Any]) -> int:
    """A positive 63-bit integer naming the event (for fields a provider keeps as int64)."""
    return int(event["id"].int & ((1 << 63) - 1))


def reply(event: Mapping[Any, Any]) -> str:
    """The remote's words about the event: the SMTP reply, DSN diagnostic or reason."""
    found = data(event)
    for key in ("reply", "diagnostic", "last_error", "reason"):
        value = found.get(key)
        if value:
            return str(value)
    return ""
