"""Record events: the event rows, their statistics counters and webhook outbox rows, all in the
caller's transaction, so a rolled-back change leaves no trace anywhere."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from postbode.events.types import EventType
from postbode.metrics import EVENTS
from postbode.store.bulk import BulkInsert, PreparedRows
from postbode.store.schema import (
    bounce_counters,
    events,
    new_id,
    stat_counters,
    utcnow,
    webhook_requests,
    webhooks,
)


@dataclass
class Event:
    """One thing that happened to a message, a delivery, a domain or an app."""

    app_id: int
    type: EventType
    stream: str = "transactional"
    tag: str | None = None
    template: str | None = None  # the alias of the template the message was made from
    message_id: uuid.UUID | None = None
    delivery_id: uuid.UUID | None = None
    recipient: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    bot: bool = False  # an open or click made by a machine (counted apart)
    # False: kept as a record only (a raw hit, such as a repeated click), neither counted in
    # the statistics nor sent to webhooks.
    counted: bool = True
    at: datetime = field(default_factory=utcnow)
    id: uuid.UUID = field(default_factory=new_id)


def minute(at: datetime) -> datetime:
    """The statistics bucket of an instant."""
    return at.replace(second=0, microsecond=0)


# The statements, built once: constructing them (and their cache keys) per call cost more CPU
# than executing them on hot paths (the delivery worker's recording, the accept group commit).
_INSERT_EVENTS = insert(events)
_INSERT_WEBHOOK_REQUESTS = insert(webhook_requests)
_ENABLED_HOOKS = select(webhooks.c.id, webhooks.c.app_id, webhooks.c.event_types).where(
    webhooks.c.app_id.in_(bindparam("app_ids", expanding=True)), webhooks.c.enabled.is_(True)
)


def _counter_upsert(dialect: Any) -> Any:
    stmt = dialect.insert(stat_counters)
    return stmt.on_conflict_do_update(
        index_elements=["app_id", "stream", "tag", "template", "bucket", "event_type"],
        set_={
            "count": stat_counters.c.count + stmt.excluded.count,
            "bot_count": stat_counters.c.bot_count + stmt.excluded.bot_count,
        },
    )


_UPSERT_COUNTERS = {"sqlite": _counter_upsert(sqlite), "postgresql": _counter_upsert(postgresql)}


def _bounce_upsert(dialect: Any) -> Any:
    stmt = dialect.insert(bounce_counters)
    return stmt.on_conflict_do_update(
        index_elements=["app_id", "stream", "tag", "bucket", "category", "hard"],
        set_={"count": bounce_counters.c.count + stmt.excluded.count},
    )


_UPSERT_BOUNCES = {"sqlite": _bounce_upsert(sqlite), "postgresql": _bounce_upsert(postgresql)}
_BOUNCED = EventType.DELIVERY_BOUNCED

CounterKey = tuple[int, str, str, str, datetime, str]  # app, stream, tag, template, minute, type
BounceKey = tuple[int, str, str, datetime, str, bool]  # app, stream, tag, minute, category, hard


def bounce_key(e: Event) -> BounceKey:
    """The bounce_counters row a delivery.bounced event bumps: its category ("unknown" when
    the bounce named none) and whether it was hard."""
    category = e.data.get("category") or "unknown"
    return (e.app_id, e.stream, e.tag or "", minute(e.at), str(category), bool(e.data.get("hard")))


class Tally:
    """Counter increments gathered over many `record` calls, bumped with one upsert per
    counter row by `bump`: a batch's writer calls it last, just before its commit, so the hot
    rows (one app's `delivery.delivered` this minute) stay locked for the shortest time."""

    def __init__(self) -> None:
        self.counts: Counter[CounterKey] = Counter()
        self.bots: Counter[CounterKey] = Counter()
        self.bounces: Counter[BounceKey] = Counter()  # delivery.bounced by category

    def add(self, batch: Iterable[Event]) -> None:
        counts, bots = self.counts, self.bots
        for e in batch:
            key = (e.app_id, e.stream, e.tag or "", e.template or "", minute(e.at), str(e.type))
            counts[key] += 1
            if e.bot:
                bots[key] += 1
            if e.type == _BOUNCED:
                self.bounces[bounce_key(e)] += 1

    def rows(self) -> list[dict[str, Any]]:
        """The counter rows to upsert, in key order: concurrent writers lock the rows they
        share in the same order, so two of them never wait for each other crosswise (a
        deadlock on PostgreSQL)."""
        return [
            {
                "app_id": k[0],
                "stream": k[1],
                "tag": k[2],
                "template": k[3],
                "bucket": k[4],
                "event_type": k[5],
                "count": n,
                "bot_count": self.bots.get(k, 0),
            }
            for k, n in sorted(self.counts.items())
        ]

    def bounce_rows(self) -> list[dict[str, Any]]:
        """The bounce_counters rows to upsert, in key order (as `rows`)."""
        return [
            {
                "app_id": k[0],
                "stream": k[1],
                "tag": k[2],
                "bucket": k[3],
                "category": k[4],
                "hard": k[5],
                "count": n,
            }
            for k, n in sorted(self.bounces.items())
        ]

    def bump(self, conn: Connection) -> None:
        """Write the increments gathered so far (in `conn`'s transaction) and forget them."""
        if not self.counts:
            return
        # One statement per row: executemany of an upsert is what both dialects do fastest.
        conn.execute(_UPSERT_COUNTERS[conn.dialect.name], self.rows())
        if self.bounces:
            conn.execute(_UPSERT_BOUNCES[conn.dialect.name], self.bounce_rows())
        self.counts.clear()
        self.bots.clear()
        self.bounces.clear()


def record(conn: Connection, items: Sequence[Event] | Event, counters: Tally | None = None) -> None:
    """Write events, bump their counters and queue their webhooks, in `conn`'s transaction.

    With `counters`, the counter increments are added to that tally instead, for the caller to
    `bump` (in the same transaction) once it has recorded everything."""
    batch = [items] if isinstance(items, Event) else list(items)
    if not batch:
        return
    conn.execute(_INSERT_EVENTS, [_event_row(e) for e in batch])
    told = [e for e in batch if e.counted]
    _queue_webhooks(conn, told)
    tally = counters if counters is not None else Tally()
    tally.add(told)
    if counters is None:
        tally.bump(conn)
    _count(batch)


def _event_row(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "app_id": e.app_id,
        "message_id": e.message_id,
        "delivery_id": e.delivery_id,
        "recipient": e.recipient,
        "type": str(e.type),
        "data": e.data,
        "created_at": e.at,
    }


def _count(batch: Sequence[Event]) -> None:
    for event_type, n in Counter(str(e.type) for e in batch).items():
        EVENTS.labels(event_type).inc(n)


_COUNTER_ROWS = {
    name: BulkInsert(stat_counters, statement=upsert) for name, upsert in _UPSERT_COUNTERS.items()
}
_BOUNCE_ROWS = {
    name: BulkInsert(bounce_counters, statement=upsert) for name, upsert in _UPSERT_BOUNCES.items()
}
_EVENT_ROWS = BulkInsert(events)


@dataclass(frozen=True)
class PreparedEvents:
    """Events made ready for the driver outside any transaction (their rows and counter
    increments converted as SQLAlchemy would): `write` then records them as `record` does,
    holding a write lock only for the statements themselves."""

    rows: PreparedRows
    told: list[Event]  # the counted ones: their webhooks are looked up when written
    counters: PreparedRows
    batch: list[Event]
    bounces: PreparedRows  # bounce_counters: none unless a delivery.bounced is among them

    def write(self, conn: Connection) -> None:
        """Write the events, queue their webhooks and bump their counters, in `conn`'s
        transaction."""
        self.write_events(conn)
        self.write_counters(conn)

    def write_events(self, conn: Connection) -> None:
        """The events and their webhook requests (`write_counters` to follow in the same
        transaction: last, where other rows are written too, as the counter rows are hot)."""
        BulkInsert.execute(conn, self.rows)
        _queue_webhooks(conn, self.told)
        _count(self.batch)

    def write_counters(self, conn: Connection) -> None:
        BulkInsert.execute(conn, self.counters)
        BulkInsert.execute(conn, self.bounces)


def prepare_record(dialect: Dialect, items: Sequence[Event]) -> PreparedEvents:
    """`items` made ready to be recorded in a transaction on `dialect` (see PreparedEvents)."""
    batch = list(items)
    told = [e for e in batch if e.counted]
    tally = Tally()
    tally.add(told)
    return PreparedEvents(
        _EVENT_ROWS.prepare(dialect, [_event_row(e) for e in batch]),
        told,
        _COUNTER_ROWS[dialect.name].prepare(dialect, tally.rows()),
        batch,
        _BOUNCE_ROWS[dialect.name].prepare(dialect, tally.bounce_rows()),
    )


class Queued:
    """Webhook requests this process has queued so far (rolled-back ones too): after a
    commit, a change tells the process's wake-ups that the webhook runner has work."""

    webhook_requests = 0


def _queue_webhooks(conn: Connection, batch: Sequence[Event]) -> None:
    if not batch:
        return
    app_ids = sorted({e.app_id for e in batch})
    hooks = conn.execute(_ENABLED_HOOKS, {"app_ids": app_ids}).all()
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
        conn.execute(_INSERT_WEBHOOK_REQUESTS, rows)
        Queued.webhook_requests += len(rows)
