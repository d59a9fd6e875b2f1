"""Postbode's own webhook payload: the event as the API names it, with its message and delivery."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def iso(at: datetime) -> str:
    """An instant as RFC 3339 in UTC with a `Z` (RFC 3339 §5.6)."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def format(event: Mapping[Any, Any], message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """`{id, type, created_at, app, message, delivery, data}`; `message` and `delivery` are null
    for events about no message or delivery."""
    return {
        "id": str(event["id"]),
        "type": event["type"],
        "created_at": iso(event["created_at"]),
        "app": event["app"],
        "message": None
        if message is None
        else {
            "id": str(message["id"]),
            "message_id": message["message_id_header"],
            "tag": message["tag"],
            "metadata": message["metadata"] or {},
            "stream": message["stream"],
        },
        "delivery": None
        if event["delivery_id"] is None
        else {"id": str(event["delivery_id"]), "recipient": event["recipient"]},
        "data": event["data"] or {},
    }
