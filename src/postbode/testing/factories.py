"""Rows for tests: apps and queued deliveries, written straight into a store."""

from __future__ import annotations

import contextlib
import secrets
import uuid
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import insert, text

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


def queue_mail(
    store: Store, app_id: int, mails: Iterable[tuple[str, str, bytes]], source: str = "api"
) -> list[str]:
    """Single-recipient messages from Shop <orders@shop.test>, each (Message-ID, recipient,
    raw), queued to the workers in one transaction (bulk inserts, no Acceptor); returns their
    Message-IDs. For tests and benchmarks that need many queued deliveries fast."""
    now = utcnow()
    message_rows: list[dict[str, Any]] = []
    raw_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    for header, recipient, raw in mails:
        message_id = new_id()
        message_rows.append(
            {
                "id": message_id,
                "app_id": app_id,
                "source": source,
                "message_id_header": header,
                "mail_from": "orders@shop.test",
                "from_header": "Shop <orders@shop.test>",
                "size": len(raw),
                "received_at": now,
            }
        )
        raw_rows.append({"message_id": message_id, "data": zlib.compress(raw)})
        delivery_rows.append(
            {
                "id": new_id(),
                "message_id": message_id,
                "app_id": app_id,
                "recipient": recipient,
                "recipient_domain": recipient.rsplit("@", 1)[-1],
                "status": "queued",
                "attempts": 0,
                "next_attempt_at": now,
                "first_queued_at": now,
                "verp_token": secrets.token_hex(12),
            }
        )
    with store.write() as conn:
        conn.execute(insert(messages), message_rows)
        conn.execute(insert(raw_messages), raw_rows)
        conn.execute(insert(deliveries), delivery_rows)
    return [row["message_id_header"] for row in message_rows]


@contextlib.contextmanager
def events_refused_for(store: Store, recipient: str) -> Iterator[None]:
    """A database trigger that fails every event insert for `recipient`: a stand-in for a bug
    (or a bad row) that breaks the recording of one delivery's outcome."""
    if store.is_sqlite:
        create = [
            f"CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.recipient = '{recipient}' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned event'); END"
        ]
        drop = ["DROP TRIGGER IF EXISTS poison"]
    else:
        create = [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.recipient = '{recipient}' THEN RAISE EXCEPTION 'poisoned event'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
        drop = ["DROP TRIGGER IF EXISTS poison ON events", "DROP FUNCTION IF EXISTS poison()"]
    with store.write() as conn:
        for statement in create:
            conn.execute(text(statement))
    try:
        yield
    finally:
        with store.write() as conn:  # the store may be shared by other tests
            for statement in drop:
                conn.execute(text(statement))
