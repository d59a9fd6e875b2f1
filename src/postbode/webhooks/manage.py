"""Webhook endpoints of an app: create, change, rotate secrets, disable, read the delivery log,
replay an event; store functions the API and the worker share."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, delete, insert, select, update

from postbode.endpoints import destinations
from postbode.endpoints.destinations import STRICT, DestinationPolicy, excerpt
from postbode.endpoints.signing import generate_secret
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import (
    events,
    new_id,
    utcnow,
    webhook_attempts,
    webhook_requests,
    webhooks,
)
from postbode.store.sealing import key_for, seal_with, unseal_with

from . import formats

ROTATION_GRACE = timedelta(hours=24)  # how long a rotated-out secret still signs
REQUEST_STATUSES = ("pending", "sending", "delivered", "failed")

_PUBLIC = (
    webhooks.c.id,
    webhooks.c.url,
    webhooks.c.event_types,
    webhooks.c.format,
    webhooks.c.enabled,
    webhooks.c.disabled_reason,
    webhooks.c.failing_since,
    webhooks.c.previous_secret_until,
    webhooks.c.created_at,
    webhooks.c.secret,  # not shown: it derives what a format's receivers verify with
)


class WebhookError(ValueError):
    """A webhook request that cannot be carried out; names the field and an HTTP status."""

    def __init__(
        self, message: str, *, code: str = "invalid", field: str | None = None, status: int = 422
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.field, self.status = message, code, field, status


# -- validation -----------------------------------------------------------------------------


def check_url(url: str, policy: DestinationPolicy = STRICT, *, credentials: bool = False) -> str:
    """endpoints.destinations.check_url, its refusal a WebhookError naming the URL field."""
    try:
        return destinations.check_url(url, policy, credentials=credentials)
    except destinations.UrlRefused as exc:
        raise WebhookError(exc.message, code=exc.code, field="url") from None


def check_event_types(types: Sequence[str], format: str = "native") -> list[str]:
    """Known event type names, each once, in the order given (empty: every type). A provider
    format reports only the events its provider has names for: empty means all of those."""
    known = {str(t) for t in EventType}
    reportable = formats.EVENT_TYPES.get(format, frozenset(known))
    for i, name in enumerate(types):
        if name not in known:
            raise WebhookError(f"unknown event type {name!r}", field=f"event_types.{i}")
        if name not in reportable:
            raise WebhookError(
                f"the {format} format has no event for {name!r}", field=f"event_types.{i}"
            )
    if not types and format != "native":
        return sorted(reportable)
    return list(dict.fromkeys(types))


def check_format(name: str) -> str:
    if name not in formats.FORMATS:
        raise WebhookError(
            f"unknown format {name!r}: use one of {', '.join(sorted(formats.FORMATS))}",
            field="format",
        )
    return name


# -- endpoints ------------------------------------------------------------------------------


def public(row: Any, key: bytes) -> dict[str, Any]:
    """A webhook as the API shows it (never its secrets; `key`: the store's sealing key)."""
    data = row._mapping
    until = data["previous_secret_until"]
    return {
        "id": data["id"],
        "url": masked(data["url"]),
        "event_types": list(data["event_types"] or []),
        "format": data["format"],
        "enabled": data["enabled"],
        "disabled_reason": data["disabled_reason"],
        "failing_since": data["failing_since"],
        "previous_secret_expires_at": until if until and until > utcnow() else None,
        "created_at": data["created_at"],
        "verification_key": formats.verification_key(
            data["format"], unseal_with(key, data["secret"])
        )
        if data["format"] == "sendgrid"
        else None,
    }


def masked(url: str) -> str:
    """The URL as shown: a basic-auth password (postmark format) is never shown again."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":********@", 1)


def create_webhook(
    store: Store,
    app_id: int,
    url: str,
    event_types: Sequence[str] = (),
    *,
    enabled: bool = True,
    format: str = "native",
    policy: DestinationPolicy = STRICT,
) -> dict[str, Any]:
    """A new endpoint; the result carries its secret, shown this once. The URL must lead
    where `policy` allows (the operator's allow-list; by default public addresses only)."""
    values = {
        "app_id": app_id,
        "url": check_url(url, policy, credentials=format == "postmark"),
        "format": check_format(format),
        "event_types": check_event_types(event_types, format),
        "enabled": enabled,
        "created_at": utcnow(),
    }
    secret = generate_secret()
    key = key_for(store)
    with store.write() as conn:
        hook_id = conn.execute(
            insert(webhooks)
            .values(**values, secret=seal_with(key, secret))
            .returning(webhooks.c.id)
        ).scalar_one()
        row = _get(conn, app_id, hook_id)
    return {**public(row, key), "secret": secret}


def list_webhooks(store: Store, app_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(*_PUBLIC).where(webhooks.c.app_id == app_id).order_by(webhooks.c.id)
        ).all()
    key = key_for(store)
    return [public(r, key) for r in rows]


def get_webhook(store: Store, app_id: int, hook_id: int) -> dict[str, Any]:
    key = key_for(store)
    with store.read() as conn:
        return public(_get(conn, app_id, hook_id), key)


def update_webhook(
    store: Store,
    app_id: int,
    hook_id: int,
    *,
    policy: DestinationPolicy = STRICT,
    **changes: Any,
) -> dict[str, Any]:
    """Change url, event_types, format or enabled; enabling a disabled endpoint clears why it
    was disabled and its failure clock."""
    values: dict[str, Any] = {}
    if changes.get("url") is not None:
        values["url"] = check_url(changes["url"], policy, credentials=True)
    if changes.get("format") is not None:
        values["format"] = check_format(changes["format"])
    if changes.get("event_types") is not None or "format" in values:
        with store.read() as conn:
            current = _get(conn, app_id, hook_id)
        types = changes.get("event_types")
        values["event_types"] = check_event_types(
            current.event_types if types is None else types, values.get("format", current.format)
        )
    if "url" in values or "format" in values:
        with store.read() as conn:
            current = _get(conn, app_id, hook_id)
        url, format = values.get("url", current.url), values.get("format", current.format)
        if urlsplit(url).username is not None and format != "postmark":
            check_url(url, policy)  # names the refusal: credentials only for postmark
    if changes.get("enabled") is not None:
        values["enabled"] = bool(changes["enabled"])
        if values["enabled"]:
            values.update(disabled_reason=None, failing_since=None)
    key = key_for(store)
    with store.write() as conn:
        _get(conn, app_id, hook_id)
        if values:
            conn.execute(update(webhooks).where(webhooks.c.id == hook_id).values(**values))
        return public(_get(conn, app_id, hook_id), key)


def delete_webhook(store: Store, app_id: int, hook_id: int) -> None:
    """Remove the endpoint with its queued requests and their attempt log."""
    with store.write() as conn:
        _get(conn, app_id, hook_id)
        conn.execute(delete(webhooks).where(webhooks.c.id == hook_id))


def rotate_secret(
    store: Store, app_id: int, hook_id: int, *, now: datetime | None = None
) -> dict[str, Any]:
    """A new secret; the one it replaces keeps signing (beside the new one) for 24 hours.
    Rotating again within those hours retires the older one at once."""
    now = now or utcnow()
    secret = generate_secret()
    key = key_for(store)
    with store.write() as conn:
        row = conn.execute(
            select(webhooks.c.secret, webhooks.c.format).where(
                webhooks.c.id == hook_id, webhooks.c.app_id == app_id
            )
        ).first()
        if row is None:
            raise _not_found(hook_id)
        current = row.secret
        conn.execute(
            update(webhooks)
            .where(webhooks.c.id == hook_id)
            .values(
                secret=seal_with(key, secret),
                previous_secret=current,
                previous_secret_until=now + ROTATION_GRACE,
            )
        )
    return {
        "secret": secret,
        "previous_secret_expires_at": now + ROTATION_GRACE,
        "verification_key": formats.verification_key(row.format, secret),
    }


def secrets_in_force(hook: Any, now: datetime, key: bytes) -> list[str]:
    """The secrets a request to this endpoint is signed with: the current one, and the
    previous one while its grace period lasts (unsealed with the store's key `key`)."""
    found = [unseal_with(key, hook.secret)]
    if hook.previous_secret and hook.previous_secret_until and hook.previous_secret_until > now:
        found.append(unseal_with(key, hook.previous_secret))
    return found


def disable(conn: Connection, hook: Any, reason: str, now: datetime) -> bool:
    """Disable an endpoint (in the caller's transaction) and record an `app.alert` saying why.

    The alert goes to the app's other enabled endpoints only: `record` queues requests for
    enabled endpoints, and this one is disabled first, so a failing endpoint cannot feed
    itself alerts."""
    changed = conn.execute(
        update(webhooks)
        .where(webhooks.c.id == hook.id, webhooks.c.enabled.is_(True))
        .values(enabled=False, disabled_reason=reason)
    ).rowcount
    if changed != 1:
        return False
    record(
        conn,
        Event(
            app_id=hook.app_id,
            type=EventType.APP_ALERT,
            at=now,
            data={
                "alert": "webhook_disabled",
                "webhook_id": hook.id,
                "url": hook.url,
                "reason": reason,
            },
        ),
    )
    return True


# -- the delivery log and replays -----------------------------------------------------------


def list_requests(
    store: Store,
    app_id: int,
    hook_id: int,
    *,
    status: str | None = None,
    cursor: uuid.UUID | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], uuid.UUID | None]:
    """The endpoint's requests, newest first, each with its attempts (oldest first):
    time, HTTP status, response time and a short excerpt of the response body."""
    r = webhook_requests
    query = select(
        r.c.id,
        r.c.event_id,
        events.c.type.label("event_type"),
        r.c.status,
        r.c.attempts,
        r.c.next_attempt_at,
        r.c.last_status_code,
        r.c.last_error,
        r.c.delivered_at,
        r.c.created_at,
    ).outerjoin(events, events.c.id == r.c.event_id)
    query = query.where(r.c.webhook_id == hook_id)
    if status is not None:
        query = query.where(r.c.status == status)
    if cursor is not None:
        query = query.where(r.c.id < cursor)
    query = query.order_by(r.c.id.desc()).limit(limit + 1)
    with store.read() as conn:
        _get(conn, app_id, hook_id)
        rows = conn.execute(query).all()
        page = rows[:limit]
        log: dict[uuid.UUID, list[dict[str, Any]]] = {row.id: [] for row in page}
        if page:
            a = webhook_attempts
            for att in conn.execute(
                select(
                    a.c.request_id,
                    a.c.started_at,
                    a.c.status_code,
                    a.c.duration_ms,
                    a.c.error,
                    a.c.response_body,
                )
                .where(a.c.request_id.in_(list(log)))
                .order_by(a.c.started_at, a.c.id)
            ):
                entry = dict(att._mapping)
                if entry["response_body"] is not None:  # kept in full before excerpts were
                    entry["response_body"] = excerpt(entry["response_body"].encode())
                log[entry.pop("request_id")].append(entry)
    out = []
    for row in page:
        item = dict(row._mapping)
        if item["status"] not in ("pending", "sending"):
            item["next_attempt_at"] = None
        item["attempt_log"] = log[row.id]
        out.append(item)
    return out, page[-1].id if len(rows) > limit else None


def replay(store: Store, app_id: int, hook_id: int, event_id: uuid.UUID) -> dict[str, Any]:
    """Queue the event for the endpoint again, as a new request (due now)."""
    now = utcnow()
    with store.write() as conn:
        hook = _get(conn, app_id, hook_id)
        if not hook.enabled:
            raise WebhookError(
                "the endpoint is disabled: enable it first", code="conflict", status=409
            )
        event_type = conn.execute(
            select(events.c.type).where(events.c.id == event_id, events.c.app_id == app_id)
        ).scalar()
        if event_type is None:
            raise WebhookError(
                f"no event {event_id} in this app", code="not_found", field="event_id", status=404
            )
        if hook.event_types and event_type not in hook.event_types:
            raise WebhookError(f"the endpoint does not subscribe to {event_type}", field="event_id")
        request_id = new_id()
        conn.execute(
            insert(webhook_requests).values(
                id=request_id,
                webhook_id=hook_id,
                event_id=event_id,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return {"id": request_id, "event_id": event_id, "status": "pending", "created_at": now}


def _get(conn: Connection, app_id: int, hook_id: int) -> Any:
    row = conn.execute(
        select(*_PUBLIC).where(webhooks.c.id == hook_id, webhooks.c.app_id == app_id)
    ).first()
    if row is None:
        raise _not_found(hook_id)
    return row


def _not_found(hook_id: int) -> WebhookError:
    return WebhookError(f"no webhook {hook_id}", code="not_found", status=404)
