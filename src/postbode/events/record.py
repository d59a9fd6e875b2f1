"""Record events: the event rows, their statistics counters and webhook outbox rows, all in the
caller's transaction, so a rolled-back change leaves no trace anywhere."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from postbode.events.types import EventType
from postbode.metrics import EVENTS
from postbode.store.schema import events, new_id, stat_counters, utcnow, webhook_requests, webhooks


@dataclass
class Event:
    """One thing that happened to a message, a delivery, a domain or an app."""

    app_id: int
    type: EventType
    stream: str = "transactional"
    tag: str | None = None
    message_id: uuid.UUID | None = None
    delivery_id: uuid.UUID | None = None
    recipient: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    bot: bool = False  # an open or click made by a machine (counted apart)
    at: datetime = field(default_factory=utcnow)
    id: uuid.UUID = field(default_factory=new_id)


def minute(at: datetime) -> datetime:
    """The statistics bucket of an instant."""
    return at.replace(second=0, microsecond=0)


def record(conn: Connection, items: Sequence[Event] | Event) -> None:
    """Write events, bump their counters and queue their webhooks, in `conn`'s transaction."""
    batch = [items] if isinstance(items, Event) else list(items)
    if not batch:
        return
    conn.execute(
        insert(events),
        [
            {
                "id": e.id,
                "app_id": e.app_id,
                "message_id": e.message_id,
                "delivery_id": e.delivery_id,
                "recipient": e.recipient,
                "type": str(e.type),
                "data": e.data,
                "created_at": e.at,
            }
            for e in batch
        ],
    )
    _bump_counters(conn, batch)
    _queue_webhooks(conn, batch)
    for e in batch:
        EVENTS.labels(str(e.type)).inc()


def _bump_counters(conn: Connection, batch: Iterable[Event]) -> None:
    counts: Counter[tuple[int, str, str, datetime, str]] = Counter()
    bots: Counter[tuple[int, str, str, datetime, str]] = Counter()
    for e in batch:
        key = (e.app_id, e.stream, e.tag or "", minute(e.at), str(e.type))
        counts[key] += 1
        bots[key] += int(e.bot)
    rows = [
        {
            "app_id": k[0],
            "stream": k[1],
            "tag": k[2],
            "bucket": k[3],
            "event_type": k[4],
            "count": n,
            "bot_count": bots[k],
        }
        for k, n in counts.items()
    ]
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(stat_counters)
    stmt = stmt.on_conflict_do_update(
        index_elements=["app_id", "stream", "tag", "bucket", "event_type"],
        set_={
            "count": stat_counters.c.count + stmt.excluded.count,
            "bot_count": stat_counters.c.bot_count + stmt.excluded.bot_count,
        },
    )
    # One statement per row: executemany of an upsert is what both dialects do fastest here.
    conn.execute(stmt, rows)


def _queue_webhooks(conn: Connection, batch: Sequence[Event]) -> None:
    app_ids = {e.app_id for e in batch}
    hooks = conn.execute(
        select(webhooks.c.id, webhooks.c.app_id, webhooks.c.event_types).where(
            webhooks.c.app_id.in_(app_ids), webhooks.c.enabled.is_(True)
        )
    ).all()
    if not hooks:
        return
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "webhook_id": hook.id,
            "event_id": e.id,
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for e in batch
        for hook in hooks
        if hook.app_id == e.app_id and (not hook.event_types or str(e.type) in hook.event_types)
    ]
    if rows:
        conn.execute(insert(webhook_requests), rows)
