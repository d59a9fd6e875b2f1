"""Inbound messages of an app: the log with search, one message parsed with its hand-off
attempts, release of a held message to its route, replay; store functions the API, the UI
and the CLI share."""

from __future__ import annotations

import uuid
import zlib
from typing import Any

from sqlalchemy import Connection, func, or_, select

from postbode.inbound.deliver import requeue
from postbode.inbound.parse import parse, stripped_reply
from postbode.inbound.routes import RouteError
from postbode.store.engine import Store
from postbode.store.schema import INBOUND_STATUSES, inbound_attempts, inbound_messages, routes

_SUMMARY = (
    inbound_messages.c.id,
    inbound_messages.c.route_id,
    routes.c.pattern.label("match"),
    inbound_messages.c.action,
    inbound_messages.c.status,
    inbound_messages.c.mail_from,
    inbound_messages.c.rcpt_to,
    inbound_messages.c.mailbox_hash,
    inbound_messages.c.from_header,
    inbound_messages.c.subject,
    inbound_messages.c.message_id_header,
    inbound_messages.c.size,
    inbound_messages.c.attempts,
    inbound_messages.c.next_attempt_at,
    inbound_messages.c.last_status_code,
    inbound_messages.c.last_error,
    inbound_messages.c.received_at,
    inbound_messages.c.delivered_at,
    inbound_messages.c.verification,
    inbound_messages.c.spam_score,
    inbound_messages.c.spam_symbols,
)


def _summary(row: Any) -> dict[str, Any]:
    item = dict(row._mapping)
    if item["status"] != "pending":
        item["next_attempt_at"] = None
    return item


def list_messages(
    store: Store,
    app_id: int,
    *,
    status: str | None = None,
    q: str | None = None,
    cursor: uuid.UUID | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], uuid.UUID | None]:
    """The app's inbound messages, newest first; `q` searches sender, recipient, From and
    Subject (case-insensitive substring)."""
    t = inbound_messages
    query = select(*_SUMMARY).outerjoin(routes, routes.c.id == t.c.route_id)
    query = query.where(t.c.app_id == app_id)
    if status is not None:
        if status not in INBOUND_STATUSES:
            raise RouteError(f"unknown status {status!r}", field="status")
        query = query.where(t.c.status == status)
    if q:
        like = f"%{q.lower()}%"
        query = query.where(
            or_(
                func.lower(t.c.mail_from).like(like),
                func.lower(t.c.rcpt_to).like(like),
                func.lower(t.c.from_header).like(like),
                func.lower(t.c.subject).like(like),
            )
        )
    if cursor is not None:
        query = query.where(t.c.id < cursor)
    query = query.order_by(t.c.id.desc()).limit(limit + 1)
    with store.read() as conn:
        rows = conn.execute(query).all()
    page = rows[:limit]
    return [_summary(r) for r in page], page[-1].id if len(rows) > limit else None


def get_message(store: Store, app_id: int, inbound_id: uuid.UUID) -> dict[str, Any]:
    """One message: its summary, the parsed view and every hand-off attempt (oldest first)."""
    t = inbound_messages
    with store.read() as conn:
        row = conn.execute(
            select(*_SUMMARY, t.c.raw, t.c.client_ip, t.c.helo)
            .outerjoin(routes, routes.c.id == t.c.route_id)
            .where(t.c.id == inbound_id, t.c.app_id == app_id)
        ).first()
        if row is None:
            raise _not_found(inbound_id)
        attempts = [
            dict(a._mapping)
            for a in conn.execute(
                select(
                    inbound_attempts.c.started_at,
                    inbound_attempts.c.duration_ms,
                    inbound_attempts.c.url,
                    inbound_attempts.c.status_code,
                    inbound_attempts.c.error,
                    inbound_attempts.c.response_body,
                )
                .where(inbound_attempts.c.inbound_id == inbound_id)
                .order_by(inbound_attempts.c.started_at, inbound_attempts.c.id)
            )
        ]
    item = _summary(row)
    item.pop("raw", None)
    item.update(client_ip=row.client_ip, helo=row.helo)
    parsed = parse(zlib.decompress(row.raw))
    item["parsed"] = {
        "from": next(iter(parsed.addresses("from")), None),
        "to": parsed.addresses("to"),
        "cc": parsed.addresses("cc"),
        "reply_to": parsed.addresses("reply-to"),
        "subject": parsed.header("subject"),
        "date": parsed.header("date") or None,
        "in_reply_to": parsed.header("in-reply-to") or None,
        "text": parsed.text,
        "html": parsed.html,
        "stripped_text_reply": stripped_reply(parsed.text),
        "headers": [{"name": n, "value": v} for n, v in parsed.headers],
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": len(a.content)}
            for a in parsed.attachments
        ],
        "warnings": parsed.warnings,
    }
    item["attempt_log"] = attempts
    return item


def raw_message(store: Store, app_id: int, inbound_id: uuid.UUID) -> bytes:
    """The message as received (with Postbode's Received line on top)."""
    with store.read() as conn:
        raw = conn.execute(
            select(inbound_messages.c.raw).where(
                inbound_messages.c.id == inbound_id, inbound_messages.c.app_id == app_id
            )
        ).scalar()
    if raw is None:
        raise _not_found(inbound_id)
    return zlib.decompress(raw)


def attachment(store: Store, inbound_id: uuid.UUID, index: int) -> tuple[str, str, bytes]:
    """(file name, content type, bytes) of one attachment (links are checked by the caller)."""
    with store.read() as conn:
        raw = conn.execute(
            select(inbound_messages.c.raw).where(inbound_messages.c.id == inbound_id)
        ).scalar()
    if raw is None:
        raise _not_found(inbound_id)
    parsed = parse(zlib.decompress(raw))
    if not 0 <= index < len(parsed.attachments):
        raise RouteError(f"no attachment {index}", code="not_found", status=404)
    found = parsed.attachments[index]
    return found.filename, found.content_type, found.content


def release(store: Store, app_id: int, inbound_id: uuid.UUID) -> dict[str, Any]:
    """Send a held message to its route's URL now."""
    with store.write() as conn:
        row = _get(conn, app_id, inbound_id)
        if row.status != "held":
            raise RouteError(f"the message is {row.status}, not held", code="conflict", status=409)
        url = conn.execute(select(routes.c.url).where(routes.c.id == row.route_id)).scalar()
        if not url:
            raise RouteError(
                "the message's route has no URL to post to: give it one first",
                code="conflict",
                status=409,
            )
        requeue(conn, inbound_id, action="post")
    return get_summary(store, app_id, inbound_id)


def replay(store: Store, app_id: int, inbound_id: uuid.UUID) -> dict[str, Any]:
    """Hand a delivered or failed message to its route again, as it is now."""
    with store.write() as conn:
        row = _get(conn, app_id, inbound_id)
        if row.status == "held":
            raise RouteError("the message is held: release it", code="conflict", status=409)
        if not requeue(conn, inbound_id, action="post"):
            raise RouteError(f"the message is {row.status} already", code="conflict", status=409)
    return get_summary(store, app_id, inbound_id)


def get_summary(store: Store, app_id: int, inbound_id: uuid.UUID) -> dict[str, Any]:
    with store.read() as conn:
        row = conn.execute(
            select(*_SUMMARY)
            .outerjoin(routes, routes.c.id == inbound_messages.c.route_id)
            .where(inbound_messages.c.id == inbound_id, inbound_messages.c.app_id == app_id)
        ).first()
    if row is None:
        raise _not_found(inbound_id)
    return _summary(row)


def _get(conn: Connection, app_id: int, inbound_id: uuid.UUID) -> Any:
    row = conn.execute(
        select(inbound_messages.c.status, inbound_messages.c.route_id).where(
            inbound_messages.c.id == inbound_id, inbound_messages.c.app_id == app_id
        )
    ).first()
    if row is None:
        raise _not_found(inbound_id)
    return row


def _not_found(inbound_id: uuid.UUID) -> RouteError:
    return RouteError(f"no inbound message {inbound_id}", code="not_found", status=404)
