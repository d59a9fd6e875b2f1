"""Rows for tests: apps and queued deliveries, written straight into a store."""

from __future__ import annotations

import secrets
import uuid
import zlib
from typing import Any

from sqlalchemy import insert

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages, new_id, raw_messages, utcnow


def make_app(store: Store, name: str | None = None) -> tenancy.NewApp:
    """A new app with its credentials."""
    return tenancy.create_app(store, name or f"app-{secrets.token_hex(4)}")


def make_queued_message(
    store: Store, app_id: int, recipients: list[str], raw: bytes = b"Subject: test\r\n\r\nhi\r\n"
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A message with one queued delivery per recipient; returns (message id, delivery ids)."""
    now = utcnow()
    message_id = new_id()
    rows: list[dict[str, Any]] = [
        {
            "id": new_id(),
            "message_id": message_id,
            "app_id": app_id,
            "recipient": rcpt,
            "recipient_domain": rcpt.rsplit("@", 1)[-1],
            "status": "queued",
            "attempts": 0,
            "next_attempt_at": now,
            "first_queued_at": now,
            "verp_token": secrets.token_hex(12),
        }
        for rcpt in recipients
    ]
    with store.write() as conn:
        conn.execute(
            insert(messages).values(
                id=message_id,
                app_id=app_id,
                source="api",
                message_id_header=f"<{message_id}@postbode.test>",
                mail_from="sender@shop.test",
                size=len(raw),
                received_at=now,
            )
        )
        conn.execute(insert(raw_messages).values(message_id=message_id, data=zlib.compress(raw)))
        if rows:
            conn.execute(insert(deliveries), rows)
    return message_id, [r["id"] for r in rows]
