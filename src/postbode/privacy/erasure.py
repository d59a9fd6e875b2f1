"""Per-person erasure (AVG/GDPR art. 17): every row of an organisation's apps that holds one
address is removed or keeps only the address's keyed hash, and on SQLite the bytes are gone
from the database file and its WAL afterwards."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Text, bindparam, cast, delete, func, or_, select, update

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.privacy.audit import Actor, write_audit
from postbode.privacy.hashing import address_key, hash_address, normalise
from postbode.privacy.retention import BOUNCE_KEYS, PENDING
from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    attempts,
    audit_log,
    deliveries,
    events,
    idempotency_keys,
    inbound_messages,
    login_attempts,
    messages,
    organizations,
    raw_messages,
    suppressions,
    utcnow,
    webhook_attempts,
    webhook_requests,
    webhooks,
)

log = logging.getLogger(__name__)

BATCH = 100  # messages per transaction
TRACKING = (
    str(EventType.MESSAGE_OPENED),
    str(EventType.MESSAGE_CLICKED),
    str(EventType.MESSAGE_UNSUBSCRIBED),
)
KINDS = (
    "messages",  # subject and metadata emptied: the person was a recipient
    "bodies",  # raw messages deleted
    "deliveries",  # recipient replaced by the hash, reply and error removed
    "deliveries_cancelled",  # still waiting (the person's, or others' of an erased body)
    "attempts",  # deleted, with their SMTP transcripts
    "events",  # deleted
    "events_reduced",  # delivery.bounced kept for the statistics, hashed and reduced
    "tracking_hits",  # opens, clicks and unsubscribes (with IP and user agent): deleted
    "webhook_requests",  # the log of those events' webhook POSTs, with responses: deleted
    "webhook_responses",  # other logged webhook responses that quote the address: emptied
    "inbound_messages",  # mail from or to the person: deleted
    "suppressions",  # kept as the hash, so the address stays suppressed
    "idempotency_records",  # stored API answers naming the person: deleted
    "audit_records",  # the address in an audit record's target or details: replaced
    "login_attempts",  # throttling records keyed by the address: deleted
)


class ErasureError(ValueError):
    """An erasure that cannot be carried out (no such organisation or app, no address)."""


@dataclass
class Erasure:
    """What an erasure did (or, with `dry_run`, would do), counted per kind.

    `in_flight` counts deliveries to the person being sent at this very moment: they (and
    their messages) are left alone, and the erasure should be run again a minute later."""

    address_hash: str
    organization: str
    apps: list[str]
    dry_run: bool
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    in_flight: int = 0
    wal_truncated: bool | None = None  # SQLite: whether the WAL was emptied afterwards
    at: datetime = field(default_factory=utcnow)
    # webhook requests deleted with their events (their responses are not counted twice)
    logged: set[Any] = field(default_factory=set, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "address_hash": self.address_hash,
            "organization": self.organization,
            "apps": self.apps,
            "dry_run": self.dry_run,
            "counts": self.counts,
            "total": sum(self.counts.values()),
            "in_flight": self.in_flight,
            "complete": self.in_flight == 0,
            "wal_truncated": self.wal_truncated,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class Scope:
    """The organisation and apps an erasure or export covers."""

    organization_id: int
    organization: str
    app_ids: dict[int, str]  # id -> name


def resolve_scope(
    store: Store, organization: str | None = None, app_id: int | None = None
) -> Scope:
    """Every app of the organisation named (the only one when there is one), or one app."""
    with store.read() as conn:
        if app_id is not None:
            row = conn.execute(
                select(
                    apps.c.id,
                    apps.c.name,
                    organizations.c.id.label("org_id"),
                    organizations.c.name.label("org"),
                )
                .join(organizations, organizations.c.id == apps.c.organization_id)
                .where(apps.c.id == app_id)
            ).first()
            if row is None:
                raise ErasureError(f"no app with id {app_id}")
            return Scope(row.org_id, row.org, {row.id: row.name})
        orgs = conn.execute(select(organizations.c.id, organizations.c.name)).all()
        if organization is None:
            if len(orgs) != 1:
                names = ", ".join(sorted(o.name for o in orgs)) or "none yet"
                raise ErasureError(f"name the organization (--org): there are {names}")
            org = orgs[0]
        else:
            named = next((o for o in orgs if o.name == organization), None)
            if named is None:
                raise ErasureError(f"no organization named {organization!r}")
            org = named
        rows = conn.execute(
            select(apps.c.id, apps.c.name).where(apps.c.organization_id == org.id)
        ).all()
    return Scope(org.id, org.name, {r.id: r.name for r in rows})


def check_address(value: str) -> str:
    """The address as erasure and export compare it; ErasureError for what is none."""
    address = normalise(value)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 320 or any(c.isspace() for c in address):
        raise ErasureError(f"not an e-mail address: {value[:100]!r}")
    return address


def person_deliveries(conn: Connection, app_ids: Iterable[int], address: str) -> list[Any]:
    """The deliveries to this address in these apps (through the lower(recipient) index)."""
    return list(
        conn.execute(
            select(
                deliveries.c.id,
                deliveries.c.message_id,
                deliveries.c.app_id,
                deliveries.c.status,
                deliveries.c.first_queued_at,
            ).where(
                deliveries.c.app_id.in_(list(app_ids)),
                func.lower(deliveries.c.recipient) == address,
            )
        )
    )


def _contains(column: Any, address: str) -> Any:
    """Whether a text or JSON column holds the address anywhere (case-insensitively)."""
    return func.lower(cast(column, Text)).contains(address, autoescape=True)


def erase(
    store: Store,
    email: str,
    scope: Scope,
    *,
    dry_run: bool = False,
    actor: Actor | None = None,
    batch: int = BATCH,
    now: datetime | None = None,
) -> Erasure:
    """Erase one person's data from the scope's apps (or count it, with `dry_run`); the
    erasure is audited under the address's hash, never the address."""
    address = check_address(email)
    key = address_key(store)
    hashed = hash_address(key, address)
    now = now or utcnow()
    result = Erasure(hashed, scope.organization, sorted(scope.app_ids.values()), dry_run, at=now)
    app_ids = list(scope.app_ids)
    if not app_ids:
        return result
    with store.read() as conn:
        found = person_deliveries(conn, app_ids, address)
    in_flight = {d.message_id for d in found if d.status == "sending"}
    result.in_flight = sum(1 for d in found if d.status == "sending")
    message_ids = sorted({d.message_id for d in found} - in_flight)
    mine = {d.id for d in found if d.message_id not in in_flight}
    for start in range(0, len(message_ids), batch):
        chunk = message_ids[start : start + batch]
        if dry_run:
            with store.read() as conn:
                _erase_messages(conn, result, key, hashed, chunk, mine, now, dry_run=True)
        else:
            with store.write() as conn:
                _erase_messages(conn, result, key, hashed, chunk, mine, now, dry_run=False)
    since = min((d.first_queued_at for d in found), default=None)
    with store.read() if dry_run else store.write() as conn:
        _erase_elsewhere(conn, result, scope, address, hashed, since, dry_run=dry_run)
        if not dry_run:
            write_audit(
                conn,
                actor or Actor("cli"),
                "privacy.erase",
                hashed,
                {"counts": result.counts, "in_flight": result.in_flight},
                organization_id=scope.organization_id,
            )
    if not dry_run and store.is_sqlite:
        result.wal_truncated = truncate_wal(store)
    log.info("erasure %s in %s: %s", hashed, scope.organization, result.counts)
    return result


def _erase_messages(
    conn: Connection,
    result: Erasure,
    key: bytes,
    hashed: str,
    message_ids: Sequence[uuid.UUID],
    mine: set[uuid.UUID],
    now: datetime,
    *,
    dry_run: bool,
) -> None:
    counts = result.counts
    rows = conn.execute(
        select(
            deliveries.c.id,
            deliveries.c.app_id,
            deliveries.c.message_id,
            deliveries.c.recipient,
            deliveries.c.status,
            messages.c.stream,
            messages.c.tag,
            messages.c.template,
        )
        .join(messages, messages.c.id == deliveries.c.message_id)
        .where(deliveries.c.message_id.in_(message_ids))
    ).all()
    own = [r for r in rows if r.id in mine]
    own_ids = [r.id for r in own]
    # Waiting deliveries of these messages cannot be sent without the body: cancelled, with
    # their event (the person's under the hash).
    waiting = [r for r in rows if r.status in PENDING and r.status != "sending"]
    counts["deliveries_cancelled"] += len(waiting)
    counts["messages"] += len(message_ids)
    counts["deliveries"] += len(own)
    counts["bodies"] += conn.execute(
        select(func.count())
        .select_from(raw_messages)
        .where(raw_messages.c.message_id.in_(message_ids))
    ).scalar_one()
    counts["attempts"] += conn.execute(
        select(func.count()).select_from(attempts).where(attempts.c.delivery_id.in_(own_ids))
    ).scalar_one()
    found = conn.execute(
        select(events.c.id, events.c.type, events.c.data, events.c.created_at).where(
            events.c.delivery_id.in_(own_ids)
        )
    ).all()
    bounced = [e for e in found if e.type == str(EventType.DELIVERY_BOUNCED)]
    tracking = [e for e in found if e.type in TRACKING]
    gone = [e for e in found if e.type != str(EventType.DELIVERY_BOUNCED)]
    counts["events_reduced"] += len(bounced)
    counts["tracking_hits"] += len(tracking)
    counts["events"] += len(gone) - len(tracking)
    event_ids = [e.id for e in found]
    logged = _webhook_log(conn, [r.app_id for r in own], found)
    counts["webhook_requests"] += len(logged)
    result.logged.update(logged)
    if dry_run:
        return
    if waiting:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_([r.id for r in waiting]), deliveries.c.status.in_(PENDING))
            .values(status="cancelled", lease_owner=None, lease_until=None, updated_at=now)
        )
    if logged:
        conn.execute(delete(webhook_requests).where(webhook_requests.c.id.in_(logged)))
    if event_ids:
        conn.execute(delete(events).where(events.c.id.in_([e.id for e in gone])))
    if bounced:
        conn.execute(
            update(events)
            .where(events.c.id == bindparam("b_id"))
            .values(recipient=hashed, data=bindparam("b_data")),
            [
                {"b_id": e.id, "b_data": {k: e.data[k] for k in BOUNCE_KEYS if k in e.data}}
                for e in bounced
            ],
        )
    if own_ids:
        conn.execute(delete(attempts).where(attempts.c.delivery_id.in_(own_ids)))
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(own_ids))
            .values(recipient=hashed, last_reply=None, error=None, updated_at=now)
        )
    conn.execute(delete(raw_messages).where(raw_messages.c.message_id.in_(message_ids)))
    conn.execute(
        update(messages)
        .where(messages.c.id.in_(message_ids))
        .values(
            subject="",
            metadata={},
            raw_purged_at=func.coalesce(messages.c.raw_purged_at, now),
        )
    )
    if waiting:
        record(
            conn,
            [
                Event(
                    app_id=r.app_id,
                    type=EventType.DELIVERY_CANCELLED,
                    stream=r.stream,
                    tag=r.tag,
                    template=r.template,
                    message_id=r.message_id,
                    delivery_id=r.id,
                    recipient=hashed if r.id in mine else r.recipient,
                    data={"action": "cancel", "previous_status": r.status, "by": "erasure"},
                    at=now,
                )
                for r in waiting
            ],
        )


def _webhook_log(conn: Connection, app_ids: Sequence[int], found: Sequence[Any]) -> list[Any]:
    """The webhook requests made for these events (found through the (webhook, created_at)
    index: a request is queued in the transaction that records its event)."""
    if not found or not app_ids:
        return []
    hooks = list(
        conn.execute(select(webhooks.c.id).where(webhooks.c.app_id.in_(set(app_ids)))).scalars()
    )
    if not hooks:
        return []
    since = min(e.created_at for e in found) - timedelta(minutes=1)
    ids = [e.id for e in found]
    out: list[Any] = []
    for start in range(0, len(ids), 500):
        out += conn.execute(
            select(webhook_requests.c.id).where(
                webhook_requests.c.webhook_id.in_(hooks),
                webhook_requests.c.created_at >= since,
                webhook_requests.c.event_id.in_(ids[start : start + 500]),
            )
        ).scalars()
    return out


def _erase_elsewhere(
    conn: Connection,
    result: Erasure,
    scope: Scope,
    address: str,
    hashed: str,
    since: datetime | None,
    *,
    dry_run: bool,
) -> None:
    """Suppressions, inbound mail, idempotency records, audit records, login throttling, and
    webhook responses (since the person's first mail) that quote the address."""
    counts = result.counts
    app_ids = list(scope.app_ids)
    responses: list[Any] = []
    if since is not None:
        responses = [
            r.id
            for r in conn.execute(
                select(webhook_attempts.c.id, webhook_attempts.c.request_id)
                .join(webhook_requests, webhook_requests.c.id == webhook_attempts.c.request_id)
                .join(webhooks, webhooks.c.id == webhook_requests.c.webhook_id)
                .where(
                    webhooks.c.app_id.in_(app_ids),
                    webhook_requests.c.created_at >= since - timedelta(minutes=1),
                    _contains(webhook_attempts.c.response_body, address),
                )
            )
            if r.request_id not in result.logged
        ]
    counts["webhook_responses"] += len(responses)
    entries = conn.execute(
        select(suppressions.c.id, suppressions.c.app_id, suppressions.c.stream).where(
            suppressions.c.app_id.in_(app_ids), suppressions.c.email == address
        )
    ).all()
    counts["suppressions"] += len(entries)
    inbound = or_(
        func.lower(inbound_messages.c.mail_from) == address,
        func.lower(inbound_messages.c.rcpt_to) == address,
    )
    counts["inbound_messages"] += conn.execute(
        select(func.count())
        .select_from(inbound_messages)
        .where(inbound_messages.c.app_id.in_(app_ids), inbound)
    ).scalar_one()
    answers = (
        idempotency_keys.c.app_id.in_(app_ids),
        _contains(idempotency_keys.c.response, address),
    )
    counts["idempotency_records"] += conn.execute(
        select(func.count()).select_from(idempotency_keys).where(*answers)
    ).scalar_one()
    audited = conn.execute(
        select(audit_log.c.id, audit_log.c.target, audit_log.c.data).where(
            audit_log.c.organization_id == scope.organization_id,
            or_(_contains(audit_log.c.target, address), _contains(audit_log.c.data, address)),
        )
    ).all()
    counts["audit_records"] += len(audited)
    counts["login_attempts"] += conn.execute(
        select(func.count()).select_from(login_attempts).where(login_attempts.c.key == address)
    ).scalar_one()
    if dry_run:
        return
    for start in range(0, len(responses), 500):
        conn.execute(
            update(webhook_attempts)
            .where(webhook_attempts.c.id.in_(responses[start : start + 500]))
            .values(response_body=None)
        )
    for entry in entries:
        # One hashed entry per (app, stream): a second erasure finds it there already.
        taken = conn.execute(
            select(suppressions.c.id).where(
                suppressions.c.app_id == entry.app_id,
                suppressions.c.stream == entry.stream,
                suppressions.c.email == hashed,
            )
        ).first()
        if taken is not None:
            conn.execute(delete(suppressions).where(suppressions.c.id == entry.id))
        else:
            conn.execute(
                update(suppressions)
                .where(suppressions.c.id == entry.id)
                .values(email=hashed, detail=None)
            )
    conn.execute(delete(inbound_messages).where(inbound_messages.c.app_id.in_(app_ids), inbound))
    conn.execute(delete(idempotency_keys).where(*answers))
    for row in audited:
        conn.execute(
            update(audit_log)
            .where(audit_log.c.id == row.id)
            .values(
                target=_replace(row.target, address, hashed)[:200],
                data=_replace(row.data, address, hashed),
            )
        )
    conn.execute(delete(login_attempts).where(login_attempts.c.key == address))


def _replace(value: Any, address: str, hashed: str) -> Any:
    """`value` (text or JSON) with every spelling of the address replaced by its hash."""
    if isinstance(value, str):
        lowered = value.lower()
        if address not in lowered:
            return value
        out, at = [], 0
        while (i := lowered.find(address, at)) >= 0:
            out += [value[at:i], hashed]
            at = i + len(address)
        return "".join([*out, value[at:]])
    if isinstance(value, dict):
        return {
            _replace(k, address, hashed): _replace(v, address, hashed) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_replace(v, address, hashed) for v in value]
    return value


def truncate_wal(store: Store, tries: int = 50) -> bool:
    """SQLite: copy the WAL into the database and empty it (`wal_checkpoint(TRUNCATE)`), so
    the old page images it held, with what was just erased, are gone from disk too. Waits
    a little for readers that still use old pages; False if they never let go."""
    raw = store.engine.raw_connection()
    try:
        for _ in range(tries):
            cursor = raw.cursor()
            busy, _log, _done = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            cursor.close()
            if not busy:
                return True
            time.sleep(0.1)  # a reader of an older snapshot: it finishes in moments
        return False
    finally:
        raw.close()
