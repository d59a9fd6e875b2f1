"""The native webhook payload: the event with its app, message and delivery."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from postbode.webhooks import formats

EVENT = {
    "id": uuid.UUID("01905d2e-0000-7000-8000-000000000001"),
    "type": "delivery.bounced",
    "created_at": datetime(2025, 3, 1, 12, 30, 5, 250000, tzinfo=UTC),
    "app": "shop",
    "app_id": 1,
    "message_id": uuid.UUID("01905d2e-0000-7000-8000-000000000002"),
    "delivery_id": uuid.UUID("01905d2e-0000-7000-8000-000000000003"),
    "recipient": "nobody@dest.test",
    "data": {"category": "user_unknown", "hard": True},
}
MESSAGE = {
    "id": EVENT["message_id"],
    "message_id_header": "<abc@shop.test>",
    "tag": "order-confirmation",
    "metadata": {"order": "42"},
    "stream": "transactional",
}


def test_native_payload() -> None:
    payload = formats.get("native")(EVENT, MESSAGE)
    assert payload == {
        "id": "01905d2e-0000-7000-8000-000000000001",
        "type": "delivery.bounced",
        "created_at": "2025-03-01T12:30:05.250000Z",
        "app": "shop",
        "message": {
            "id": "01905d2e-0000-7000-8000-000000000002",
            "message_id": "<abc@shop.test>",
            "tag": "order-confirmation",
            "metadata": {"order": "42"},
            "stream": "transactional",
        },
        "delivery": {"id": "01905d2e-0000-7000-8000-000000000003", "recipient": "nobody@dest.test"},
        "data": {"category": "user_unknown", "hard": True},
    }
    json.dumps(payload)  # plain JSON types only


def test_events_about_no_message_have_null_message_and_delivery() -> None:
    alert = {
        **EVENT,
        "type": "app.alert",
        "message_id": None,
        "delivery_id": None,
        "recipient": None,
    }
    payload = formats.get("native")(alert, None)
    assert payload["message"] is None and payload["delivery"] is None


def test_unknown_format() -> None:
    with pytest.raises(KeyError):
        formats.get("postmark-v0")
    assert "native" in formats.FORMATS
