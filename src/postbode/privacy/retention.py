"""Retention, enforced: message bodies go after the app's body window, addresses become keyed
hashes after its metadata window (the rows statistics need stay), logs and audit records go
after theirs. Run as a periodic task, in small batches, each its own short transaction."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, exists, func, insert, select, update

from postbode.events.types import EventType
from postbode.privacy.hashing import address_key, hash_address, is_hashed
from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    attempts,
    audit_log,
    deliveries,
    events,
    idempotency_keys,
    inbound_messages,
    messages,
    organizations,
    raw_messages,
    suppressions,
    system_values,
    utcnow,
    webhook_requests,
    webhooks,
)

log = logging.getLogger(__name__)

# A delivery in one of these has not ended: its message keeps body and addresses.
PENDING = ("queued", "sending", "deferred", "held")
INBOUND_PENDING = ("pending", "sending", "held")  # the source is still needed
BATCH = 200  # messages (or rows of a log) per transaction
RUN_SECONDS = 40.0  # one run stops after this; the next run goes on where it stopped
EVERY_SECONDS = 60.0  # and "don't store bodies" removes a body this soon after it ended
# Event data statistics read from a kept delivery.bounced event (stats/queries.py: the bounce
# reasons); everything else in it (diagnostic text, replies) may name the person.
BOUNCE_KEYS = ("category", "hard", "status", "source")
# per app, and per incarnation of an app id (SQLite may give a deleted app's id to a new one)
_WATERMARK = "privacy.events.{app}.{created}"
# An Idempotency-Key answers repeats for 24 hours (ingest/accept.py); kept a day longer.
IDEMPOTENCY_KEPT = timedelta(hours=48)

Clock = Callable[[], datetime]
Pause = Callable[[float], None]


@dataclass(frozen=True)
class Policy:
    """One app's windows."""

    app_id: int
    organization_id: int
    raw_days: int
    metadata_days: int
    store_bodies: bool
    created_at: datetime

    def raw_cutoff(self, now: datetime) -> datetime:
        return now if not self.store_bodies else now - timedelta(days=self.raw_days)

    def metadata_cutoff(self, now: datetime) -> datetime:
        return now - timedelta(days=self.metadata_days)


@dataclass
class PurgeReport:
    """What one run removed, by kind; `complete` is False when it stopped for time."""

    bodies: int = 0
    messages_hashed: int = 0
    deliveries_hashed: int = 0
    attempts: int = 0
    events: int = 0
    events_reduced: int = 0
    webhook_requests: int = 0
    inbound_bodies: int = 0
    inbound_messages: int = 0
    idempotency_records: int = 0
    suppressions_expired: int = 0
    audit_records: int = 0
    batches: int = 0
    complete: bool = True

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Purge:
    """One run of the retention purge over every app, `batch` rows per transaction.

    On SQLite the write lock is let go after every batch, and the purge then rests as long as
    the batch took (`pause`), so SMTP and API accepts, which wait for that lock, get their turn
    at once; `budget` seconds bound one run."""

    def __init__(
        self,
        store: Store,
        *,
        now: datetime | None = None,
        batch: int = BATCH,
        budget: float = RUN_SECONDS,
        pause: Pause | None = None,
    ) -> None:
        self.store = store
        self.now = now or utcnow()
        self.batch = batch
        self.deadline = time.monotonic() + budget
        self.pause = pause if pause is not None else (time.sleep if store.is_sqlite else None)
        self.key = address_key(store)
        self.report = PurgeReport()

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> PurgeReport:
        with self.store.read() as conn:
            policies = [
                Policy(
                    r.id,
                    r.organization_id,
                    r.raw_retention_days,
                    r.metadata_retention_days,
                    r.store_bodies,
                    r.created_at,
                )
                for r in conn.execute(
                    select(
                        apps.c.id,
                        apps.c.organization_id,
                        apps.c.raw_retention_days,
                        apps.c.metadata_retention_days,
                        apps.c.store_bodies,
                        apps.c.created_at,
                    ).order_by(apps.c.id)
                )
            ]
            orgs = conn.execute(
                select(organizations.c.id, organizations.c.audit_retention_days)
            ).all()
        steps: list[Callable[[], bool]] = []
        for p in policies:
            steps += [
                lambda p=p: self.bodies(p),  # type: ignore[misc]
                lambda p=p: self.addresses(p),  # type: ignore[misc]
                lambda p=p: self.events(p),  # type: ignore[misc]
                lambda p=p: self.webhook_log(p),  # type: ignore[misc]
                lambda p=p: self.inbound(p),  # type: ignore[misc]
                lambda p=p: self.small_logs(p),  # type: ignore[misc]
            ]
        for org in orgs:
            steps.append(lambda o=org: self.audit(o.id, o.audit_retention_days))  # type: ignore[misc]
        for step in steps:
            # a step returns True while it found a full batch (there may be more)
            while step():
                if self.out_of_time():
                    self.report.complete = False
                    self._log()
                    return self.report
        self._log()
        return self.report

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def _log(self) -> None:
        found = {k: v for k, v in self.report.as_json().items() if v and k != "complete"}
        if found:
            log.info("retention purge: %s", found)

    def _write(self, work: Callable[[Connection], int]) -> int:
        """One batch in its own transaction; then, on SQLite, a rest as long as it took."""
        began = time.monotonic()
        with self.store.write() as conn:
            n = work(conn)
        self.report.batches += 1
        if self.pause is not None and n:
            self.pause(max(time.monotonic() - began, 0.001))
        return n

    # -- bodies --------------------------------------------------------------------------------

    def bodies(self, p: Policy) -> bool:
        """Bodies of messages older than the body window (or any, for an app that stores no
        bodies) whose deliveries have all ended."""
        cutoff = p.raw_cutoff(self.now)

        def work(conn: Connection) -> int:
            ids = (
                conn.execute(
                    select(messages.c.id)
                    .where(
                        messages.c.app_id == p.app_id,
                        messages.c.raw_purged_at.is_(None),
                        messages.c.received_at <= cutoff,
                        ~_has_pending(),
                    )
                    .order_by(messages.c.received_at)
                    .limit(self.batch)
                )
                .scalars()
                .all()
            )
            if ids:
                _drop_bodies(conn, list(ids), self.now)
            return len(ids)

        n = self._write(work)
        self.report.bodies += n
        return n == self.batch

    # -- addresses -----------------------------------------------------------------------------

    def addresses(self, p: Policy) -> bool:
        """Messages older than the metadata window, all deliveries ended: recipients become
        keyed hashes, replies and transcripts go, subject and metadata are emptied."""
        cutoff = p.metadata_cutoff(self.now)

        def work(conn: Connection) -> int:
            ids = list(
                conn.execute(
                    select(messages.c.id)
                    .where(
                        messages.c.app_id == p.app_id,
                        messages.c.addresses_hashed_at.is_(None),
                        messages.c.received_at <= cutoff,
                        ~_has_pending(),
                    )
                    .order_by(messages.c.received_at)
                    .limit(self.batch)
                ).scalars()
            )
            if not ids:
                return 0
            hashed, removed = hash_message_addresses(conn, self.key, ids, self.now)
            self.report.deliveries_hashed += hashed
            self.report.attempts += removed
            self.report.bodies += _drop_bodies(conn, ids, self.now)
            return len(ids)

        n = self._write(work)
        self.report.messages_hashed += n
        return n == self.batch

    # -- events --------------------------------------------------------------------------------

    def events(self, p: Policy) -> bool:
        """Events older than the metadata window: deleted, except delivery.bounced, which the
        bounce statistics read and which keeps only its category, hard/soft and status.
        A watermark per app remembers how far this went, so kept events are looked at once."""
        cutoff = p.metadata_cutoff(self.now)
        name = _WATERMARK.format(app=p.app_id, created=int(p.created_at.timestamp() * 1e6))

        def work(conn: Connection) -> int:
            mark = conn.execute(
                select(system_values.c.value).where(system_values.c.name == name)
            ).scalar()
            query = select(
                events.c.id, events.c.type, events.c.recipient, events.c.data, events.c.created_at
            ).where(events.c.app_id == p.app_id, events.c.created_at < cutoff)
            if mark is not None:  # keyset (created_at, id): kept rows are looked at once
                at_text, _, after_id = mark.partition("|")
                since = datetime.fromisoformat(at_text)
                query = query.where(events.c.created_at >= since)
                if after_id:
                    query = query.where(
                        ~and_(events.c.created_at == since, events.c.id <= uuid.UUID(after_id))
                    )
            rows = conn.execute(
                query.order_by(events.c.created_at, events.c.id).limit(self.batch)
            ).all()
            if not rows:
                return 0
            bounced = [r for r in rows if r.type == str(EventType.DELIVERY_BOUNCED)]
            gone = [r.id for r in rows if r.type != str(EventType.DELIVERY_BOUNCED)]
            if gone:
                conn.execute(delete(events).where(events.c.id.in_(gone)))
            if bounced:
                conn.execute(
                    update(events)
                    .where(events.c.id == bindparam("b_id"))
                    .values(recipient=bindparam("b_recipient"), data=bindparam("b_data")),
                    [
                        {
                            "b_id": r.id,
                            "b_recipient": _hashed(self.key, r.recipient),
                            "b_data": {
                                k: (r.data or {}).get(k) for k in BOUNCE_KEYS if k in (r.data or {})
                            },
                        }
                        for r in bounced
                    ],
                )
            if len(rows) == self.batch:
                _set_value(conn, name, f"{rows[-1].created_at.isoformat()}|{rows[-1].id}")
            else:  # everything before the cutoff is done
                _set_value(conn, name, cutoff.isoformat())
            self.report.events += len(gone)
            self.report.events_reduced += len(bounced)
            return len(rows)

        n = self._write(work)
        return n == self.batch

    # -- webhook request log, inbound mail, small logs --------------------------------------------

    def webhook_log(self, p: Policy) -> bool:
        """Webhook requests (and their attempts, with the responses) past the metadata window."""
        cutoff = p.metadata_cutoff(self.now)

        def work(conn: Connection) -> int:
            ids = list(
                conn.execute(
                    select(webhook_requests.c.id)
                    .join(webhooks, webhooks.c.id == webhook_requests.c.webhook_id)
                    .where(webhooks.c.app_id == p.app_id, webhook_requests.c.created_at < cutoff)
                    .limit(self.batch)
                ).scalars()
            )
            if ids:  # the attempts go with them (ON DELETE CASCADE)
                conn.execute(delete(webhook_requests).where(webhook_requests.c.id.in_(ids)))
            return len(ids)

        n = self._write(work)
        self.report.webhook_requests += n
        return n == self.batch

    def inbound(self, p: Policy) -> bool:
        """Inbound mail: the body emptied after the body window once handed over, the row
        deleted after the metadata window."""
        raw_cutoff, cutoff = p.raw_cutoff(self.now), p.metadata_cutoff(self.now)

        def work(conn: Connection) -> int:
            ids = list(
                conn.execute(
                    select(inbound_messages.c.id)
                    .where(
                        inbound_messages.c.app_id == p.app_id,
                        inbound_messages.c.received_at < cutoff,
                    )
                    .limit(self.batch)
                ).scalars()
            )
            if ids:
                conn.execute(delete(inbound_messages).where(inbound_messages.c.id.in_(ids)))
            self.report.inbound_messages += len(ids)
            emptied = conn.execute(
                update(inbound_messages)
                .where(
                    inbound_messages.c.id.in_(
                        select(inbound_messages.c.id)
                        .where(
                            inbound_messages.c.app_id == p.app_id,
                            inbound_messages.c.received_at < raw_cutoff,
                            inbound_messages.c.status.not_in(INBOUND_PENDING),
                            func.length(inbound_messages.c.raw) > 0,
                        )
                        .limit(self.batch)
                        .scalar_subquery()
                    )
                )
                .values(raw=b"")
            ).rowcount
            self.report.inbound_bodies += emptied
            return max(len(ids), emptied)

        n = self._write(work)
        return n == self.batch

    def small_logs(self, p: Policy) -> bool:
        """Idempotency records past their use (they hold the answer, with the recipients'
        addresses) and expired suppressions past the metadata window."""
        cutoff = p.metadata_cutoff(self.now)
        keys_cutoff = min(cutoff, self.now - IDEMPOTENCY_KEPT)

        def work(conn: Connection) -> int:
            keys = conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.app_id == p.app_id,
                    idempotency_keys.c.created_at < keys_cutoff,
                )
            ).rowcount
            expired = conn.execute(
                delete(suppressions).where(
                    suppressions.c.app_id == p.app_id,
                    suppressions.c.expires_at.is_not(None),
                    suppressions.c.expires_at < cutoff,
                )
            ).rowcount
            self.report.idempotency_records += keys
            self.report.suppressions_expired += expired
            return 0  # small tables: one statement each, not batched

        self._write(work)
        return False

    def audit(self, org_id: int, days: int) -> bool:
        """Audit records past the organisation's audit window."""
        cutoff = self.now - timedelta(days=days)

        def work(conn: Connection) -> int:
            ids = list(
                conn.execute(
                    select(audit_log.c.id)
                    .where(audit_log.c.organization_id == org_id, audit_log.c.created_at < cutoff)
                    .limit(self.batch)
                ).scalars()
            )
            if ids:
                conn.execute(delete(audit_log).where(audit_log.c.id.in_(ids)))
            return len(ids)

        n = self._write(work)
        self.report.audit_records += n
        return n == self.batch


# -- pieces erasure uses too ---------------------------------------------------------------------


def _has_pending() -> Any:
    return exists().where(
        deliveries.c.message_id == messages.c.id, deliveries.c.status.in_(PENDING)
    )


def _hashed(key: bytes, value: str | None) -> str | None:
    if value is None or is_hashed(value):
        return value
    return hash_address(key, value)


def _drop_bodies(conn: Connection, ids: list[Any], now: datetime) -> int:
    """Delete the bodies of these messages and mark them purged; returns how many went."""
    gone = conn.execute(delete(raw_messages).where(raw_messages.c.message_id.in_(ids))).rowcount
    conn.execute(
        update(messages)
        .where(messages.c.id.in_(ids), messages.c.raw_purged_at.is_(None))
        .values(raw_purged_at=now)
    )
    return int(gone)


def hash_message_addresses(
    conn: Connection, key: bytes, ids: list[Any], now: datetime
) -> tuple[int, int]:
    """For these messages: every delivery's recipient becomes its keyed hash (last reply and
    parked error, which may quote it, go), their attempts (transcripts) are deleted, and the
    message keeps no subject or metadata. Returns (deliveries hashed, attempts deleted)."""
    rows = conn.execute(
        select(deliveries.c.id, deliveries.c.recipient).where(deliveries.c.message_id.in_(ids))
    ).all()
    if rows:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == bindparam("d_id"))
            .values(recipient=bindparam("d_recipient"), last_reply=None, error=None),
            [{"d_id": r.id, "d_recipient": _hashed(key, r.recipient)} for r in rows],
        )
    removed = 0
    delivery_ids = [r.id for r in rows]
    for start in range(0, len(delivery_ids), 500):
        removed += conn.execute(
            delete(attempts).where(attempts.c.delivery_id.in_(delivery_ids[start : start + 500]))
        ).rowcount
    conn.execute(
        update(messages)
        .where(messages.c.id.in_(ids))
        .values(subject="", metadata={}, addresses_hashed_at=now)
    )
    return len(rows), int(removed)


def _set_value(conn: Connection, name: str, value: str) -> None:
    changed = conn.execute(
        update(system_values).where(system_values.c.name == name).values(value=value)
    ).rowcount
    if not changed:
        conn.execute(insert(system_values).values(name=name, value=value))


def purge(
    store: Store,
    *,
    now: datetime | None = None,
    batch: int = BATCH,
    budget: float = RUN_SECONDS,
    pause: Pause | None = None,
) -> PurgeReport:
    """One retention run (the periodic task `privacy.retention`, or `postbode privacy
    purge`): everything past its window, in batches, for at most `budget` seconds."""
    return Purge(store, now=now, batch=batch, budget=budget, pause=pause).run()


__all__ = [
    "BATCH",
    "PENDING",
    "Policy",
    "Purge",
    "PurgeReport",
    "hash_message_addresses",
    "purge",
]
