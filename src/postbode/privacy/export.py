"""Per-person export (AVG/GDPR art. 15 and 20): everything an organisation's apps hold about one
address as one machine-readable JSON document with a schema version."""

from __future__ import annotations

import uuid
import zlib
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from postbode.privacy.audit import EXPORT_PERSON, Actor, write_audit
from postbode.privacy.erasure import TRACKING, Scope, check_address, person_deliveries
from postbode.privacy.hashing import address_key, hash_address
from postbode.store.engine import Store
from postbode.store.schema import (
    attempts,
    deliveries,
    events,
    inbound_messages,
    messages,
    raw_messages,
    suppressions,
    utcnow,
    webhook_requests,
    webhooks,
)

SCHEMA = "postbode.privacy.export"
SCHEMA_VERSION = 1
CHUNK = 500  # ids per IN (…) list


def _plain(value: Any) -> Any:
    """A value as JSON carries it: UUIDs and times as strings, bytes as text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _chunks(ids: list[Any]) -> list[list[Any]]:
    return [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]


def export(
    store: Store,
    email: str,
    scope: Scope,
    *,
    actor: Actor | None = None,
    bodies: bool = True,
) -> dict[str, Any]:
    """The export document for one address in the scope's apps; the export is audited under
    the address's hash. `bodies`: include each stored message source as text."""
    address = check_address(email)
    hashed = hash_address(address_key(store), address)
    app_ids = list(scope.app_ids)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "generated_at": utcnow().isoformat(),
        "subject": {"email": address},
        "organization": scope.organization,
        "apps": sorted(scope.app_ids.values()),
    }
    with store.read() as conn:
        found = person_deliveries(conn, app_ids, address) if app_ids else []
        delivery_ids = [d.id for d in found]
        message_ids = sorted({d.message_id for d in found})
        msg_rows = [
            r
            for ids in _chunks(message_ids)
            for r in conn.execute(select(messages).where(messages.c.id.in_(ids))).mappings()
        ]
        sources: dict[Any, bytes] = {}
        if bodies:
            for ids in _chunks(message_ids):
                for r in conn.execute(
                    select(raw_messages.c.message_id, raw_messages.c.data).where(
                        raw_messages.c.message_id.in_(ids)
                    )
                ):
                    sources[r.message_id] = zlib.decompress(r.data)
        delivery_rows = [
            r
            for ids in _chunks(delivery_ids)
            for r in conn.execute(
                select(deliveries).where(deliveries.c.id.in_(ids)).order_by(deliveries.c.id)
            ).mappings()
        ]
        attempt_rows = [
            r
            for ids in _chunks(delivery_ids)
            for r in conn.execute(
                select(attempts)
                .where(attempts.c.delivery_id.in_(ids))
                .order_by(attempts.c.started_at)
            ).mappings()
        ]
        event_rows = [
            r
            for ids in _chunks(delivery_ids)
            for r in conn.execute(
                select(events).where(events.c.delivery_id.in_(ids)).order_by(events.c.id)
            ).mappings()
        ]
        hook_rows = (
            [
                r
                for ids in _chunks([e["id"] for e in event_rows])
                for r in conn.execute(
                    select(
                        webhook_requests.c.id,
                        webhook_requests.c.event_id,
                        webhook_requests.c.status,
                        webhook_requests.c.attempts,
                        webhook_requests.c.last_status_code,
                        webhook_requests.c.delivered_at,
                        webhook_requests.c.created_at,
                        webhooks.c.url,
                    )
                    .join(webhooks, webhooks.c.id == webhook_requests.c.webhook_id)
                    .where(webhooks.c.app_id.in_(app_ids), webhook_requests.c.event_id.in_(ids))
                ).mappings()
            ]
            if event_rows
            else []
        )
        suppression_rows = (
            conn.execute(
                select(suppressions).where(
                    suppressions.c.app_id.in_(app_ids),
                    suppressions.c.email.in_([address, hashed]),
                )
            )
            .mappings()
            .all()
            if app_ids
            else []
        )
        inbound_rows = (
            conn.execute(
                select(inbound_messages).where(
                    inbound_messages.c.app_id.in_(app_ids),
                    or_(
                        func.lower(inbound_messages.c.mail_from) == address,
                        func.lower(inbound_messages.c.rcpt_to) == address,
                    ),
                )
            )
            .mappings()
            .all()
            if app_ids
            else []
        )

    names = scope.app_ids
    by_delivery_attempts: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for a in attempt_rows:
        by_delivery_attempts[a["delivery_id"]].append(
            {k: _plain(v) for k, v in a.items() if k != "delivery_id"}
        )
    by_delivery_events: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in event_rows:
        by_delivery_events[e["delivery_id"]].append(
            {
                "id": str(e["id"]),
                "type": e["type"],
                "at": e["created_at"].isoformat(),
                "data": _plain(e["data"] or {}),
            }
        )
    by_message: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for d in delivery_rows:
        by_message[d["message_id"]].append(
            {
                "id": str(d["id"]),
                "recipient": d["recipient"],
                "status": d["status"],
                "attempt_count": d["attempts"],
                "first_queued_at": _plain(d["first_queued_at"]),
                "last_attempt_at": _plain(d["last_attempt_at"]),
                "mx": d["mx"],
                "last_reply": d["last_reply"],
                "bounce_category": d["bounce_category"],
                "bounce_status": d["bounce_status"],
                "hard_bounce": d["hard"],
                "attempts": by_delivery_attempts.get(d["id"], []),
                "events": by_delivery_events.get(d["id"], []),
            }
        )
    doc["messages"] = [
        {
            "id": str(m["id"]),
            "app": names.get(m["app_id"], str(m["app_id"])),
            "received_at": m["received_at"].isoformat(),
            "source": m["source"],
            "stream": m["stream"],
            "tag": m["tag"],
            "metadata": _plain(m["metadata"] or {}),
            "message_id": m["message_id_header"],
            "envelope_from": m["mail_from"],
            "from": m["from_header"],
            "subject": m["subject"],
            "size": m["size"],
            "body_purged_at": _plain(m["raw_purged_at"]),
            "content": sources[m["id"]].decode("utf-8", "replace") if m["id"] in sources else None,
            "deliveries": by_message.get(m["id"], []),
        }
        for m in sorted(msg_rows, key=lambda m: m["received_at"])
    ]
    doc["suppressions"] = [
        {
            "app": names.get(s["app_id"], str(s["app_id"])),
            "stream": s["stream"],
            "reason": s["reason"],
            "source": s["source"],
            "since": _plain(s["created_at"]),
            "expires_at": _plain(s["expires_at"]),
            "kept_as_hash": s["email"] == hashed,
        }
        for s in suppression_rows
    ]
    doc["inbound_messages"] = [
        {
            "id": str(i["id"]),
            "app": names.get(i["app_id"], str(i["app_id"])),
            "received_at": _plain(i["received_at"]),
            "mail_from": i["mail_from"],
            "rcpt_to": i["rcpt_to"],
            "subject": i["subject"],
            "message_id": i["message_id_header"],
            "status": i["status"],
            "content": _inbound_text(i["raw"]) if bodies else None,
        }
        for i in inbound_rows
    ]
    doc["webhook_requests"] = [
        {
            "id": str(h["id"]),
            "event_id": str(h["event_id"]),
            "url": h["url"],
            "status": h["status"],
            "attempts": h["attempts"],
            "last_status_code": h["last_status_code"],
            "delivered_at": _plain(h["delivered_at"]),
            "created_at": _plain(h["created_at"]),
        }
        for h in hook_rows
    ]
    doc["counts"] = {
        "messages": len(doc["messages"]),
        "deliveries": len(delivery_rows),
        "attempts": len(attempt_rows),
        "events": len(event_rows),
        "tracking_hits": sum(1 for e in event_rows if e["type"] in TRACKING),
        "suppressions": len(doc["suppressions"]),
        "inbound_messages": len(doc["inbound_messages"]),
        "webhook_requests": len(doc["webhook_requests"]),
    }
    with store.write() as conn:
        write_audit(
            conn,
            actor or Actor("cli"),
            EXPORT_PERSON,
            hashed,
            {"counts": doc["counts"]},
            organization_id=scope.organization_id,
        )
    return doc


def _inbound_text(raw: bytes | None) -> str | None:
    """An inbound message's stored source as text (zlib-compressed; empty once purged)."""
    if not raw:
        return None
    try:
        return zlib.decompress(raw).decode("utf-8", "replace")
    except zlib.error:
        return raw.decode("utf-8", "replace")
