"""Mail Postbode writes itself (alerts, reports): queued for delivery like any other message of
an app, in the caller's transaction, with source `system` so an app's hold never holds it."""

from __future__ import annotations

import email.utils
import secrets
import uuid
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.message import EmailMessage
from typing import Any

from sqlalchemy import Connection, insert

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.schema import SYSTEM_SOURCE, deliveries, messages, new_id, raw_messages

__all__ = ["SYSTEM_SOURCE", "queue_system_mail"]


def queue_system_mail(
    conn: Connection,
    *,
    app_id: int,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    body: str,
    tag: str,
    html: str | None = None,
    now: datetime,
    metadata: Mapping[str, Any] | None = None,
) -> uuid.UUID:
    """Queue a message from `sender` to `recipients` (one delivery each): its message, raw
    source, deliveries and events. Plain text, or with `html` multipart/alternative (RFC 2046
    §5.1.4: the text part first, the richer one last). Returns the message id."""
    message_id = new_id()
    header_id = f"<{message_id}@{sender.rpartition('@')[2] or 'postbode'}>"
    mail = EmailMessage()
    mail["From"] = f"Postbode <{sender}>"
    mail["To"] = ", ".join(recipients)
    mail["Subject"] = subject[:200]
    mail["Date"] = email.utils.format_datetime(now)
    mail["Message-ID"] = header_id
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
    mail.set_content(body)
    if html is not None:
        mail.add_alternative(html, subtype="html")
    raw = mail.as_bytes()
    conn.execute(
        insert(messages).values(
            id=message_id,
            app_id=app_id,
            source=SYSTEM_SOURCE,
            stream="transactional",
            tag=tag,
            metadata=dict(metadata or {}),
            message_id_header=header_id,
            mail_from=sender,
            from_header=str(mail["From"]),
            subject=str(mail["Subject"]),
            size=len(raw),
            domain_verified=False,
            track_opens=False,
            track_clicks=False,
            received_at=now,
        )
    )
    conn.execute(
        insert(raw_messages).values(
            message_id=message_id, compression="zlib", data=zlib.compress(raw)
        )
    )
    events = [
        Event(
            app_id=app_id,
            type=EventType.MESSAGE_RECEIVED,
            tag=tag,
            message_id=message_id,
            data={"source": SYSTEM_SOURCE, "recipients": len(recipients)},
            at=now,
        )
    ]
    rows = []
    for rcpt in recipients:
        delivery_id = new_id()
        rows.append(
            {
                "id": delivery_id,
                "message_id": message_id,
                "app_id": app_id,
                "recipient": rcpt,
                "recipient_domain": rcpt.rpartition("@")[2].lower(),
                "status": "queued",
                "attempts": 0,
                "next_attempt_at": now,
                "first_queued_at": now,
                "verp_token": secrets.token_hex(12),
                "updated_at": now,
            }
        )
        events.append(
            Event(
                app_id=app_id,
                type=EventType.DELIVERY_QUEUED,
                tag=tag,
                message_id=message_id,
                delivery_id=delivery_id,
                recipient=rcpt,
                at=now,
            )
        )
    conn.execute(insert(deliveries), rows)
    record(conn, events)
    return message_id
