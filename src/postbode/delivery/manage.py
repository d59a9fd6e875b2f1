"""Queue management: retry, cancel and release deliveries (one or in bulk) and the queue view."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Row, func, literal_column, select, update

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import DELIVERY_STATUSES, deliveries, events, messages, utcnow

__all__ = [
    "ACTIONS",
    "CHUNK",
    "QUEUE_STATUSES",
    "BadFilter",
    "DeliveryFilter",
    "ManageError",
    "NotFound",
    "WrongState",
    "cancel",
    "cancel_message",
    "change_many",
    "change_one",
    "get_delivery",
    "list_deliveries",
    "queue_summary",
    "release",
    "retry",
]

# what the queue view shows by default
QUEUE_STATUSES = ("scheduled", "queued", "deferred", "sending", "held")
CHUNK = 500  # rows changed per transaction in bulk, so no transaction holds the queue for long
REPLY_CHARS = 100  # last replies are grouped by their first characters (times, ids differ after)
TOP_GROUPS = 20  # largest groups shown per summary grouping
# next_attempt_at means something for these
_WILL_BE_TRIED = ("scheduled", "queued", "deferred", "sending")

ActionName = Literal["retry", "cancel", "release"]


@dataclass(frozen=True)
class Action:
    """A change people make to deliveries: which states it applies to and where they go."""

    name: ActionName
    sources: tuple[str, ...]
    target: str


ACTIONS: dict[str, Action] = {
    # Due now, whatever the backoff, a hold or an earlier failure said. A row being sent
    # ('sending', leased to a worker) is never touched: its worker records the outcome.
    # A scheduled delivery retried is sent now instead of at its send_at.
    "retry": Action("retry", ("scheduled", "deferred", "held", "failed"), "queued"),
    "cancel": Action("cancel", ("scheduled", "queued", "deferred", "held"), "cancelled"),
    "release": Action("release", ("held",), "queued"),
}


class ManageError(Exception):
    """A queue change that cannot be made; `code`, `message`, `field` as the API shows them."""

    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(ManageError):
    """No such delivery in this app (another app's is as absent as one that never was)."""

    code = "not_found"


class WrongState(ManageError):
    """The delivery's state does not allow the change (delivered, being sent …)."""

    code = "conflict"

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message, "status")
        self.status = status


class BadFilter(ManageError):
    """A bulk filter or list query that names no deliveries sensibly."""

    code = "invalid"


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a bulk change is about; every given field must match."""

    status: Sequence[str] | None = None  # None: every state the action applies to
    recipient_domain: str | None = None
    tag: str | None = None
    older_than_seconds: float | None = None  # queued at least this long ago (first_queued_at)
    ids: Sequence[uuid.UUID] | None = None
    message_id: uuid.UUID | None = None  # the deliveries of one message

    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (
                self.status,
                self.recipient_domain,
                self.tag,
                self.older_than_seconds,
                self.ids,
                self.message_id,
            )
        )


# -- changing deliveries ------------------------------------------------------------------------


def retry(store: Store, app_id: int, delivery_id: uuid.UUID, *, by: str = "api") -> dict[str, Any]:
    """Make a deferred, held or failed delivery due now; returns the delivery."""
    return change_one(store, app_id, delivery_id, "retry", by=by)


def cancel(store: Store, app_id: int, delivery_id: uuid.UUID, *, by: str = "api") -> dict[str, Any]:
    """Cancel a queued, deferred or held delivery; returns the delivery."""
    return change_one(store, app_id, delivery_id, "cancel", by=by)


def cancel_message(store: Store, app_id: int, message_id: uuid.UUID, *, by: str = "api") -> int:
    """Cancel every delivery of a message of `app_id` not sent yet (scheduled, queued,
    deferred or held), each with its `delivery.cancelled`; returns how many. A delivery being
    sent right now is left to its worker. Raises NotFound for another app's message."""
    with store.read() as conn:
        owner = conn.execute(select(messages.c.app_id).where(messages.c.id == message_id)).scalar()
    if owner != app_id:  # another app's message is as absent as one that never was
        raise NotFound(f"no message {message_id}", "id")
    return change_many(store, app_id, "cancel", DeliveryFilter(message_id=message_id), by=by)


def release(
    store: Store, app_id: int, delivery_id: uuid.UUID, *, by: str = "api"
) -> dict[str, Any]:
    """Release a held delivery to the queue; returns the delivery."""
    return change_one(store, app_id, delivery_id, "release", by=by)


def change_one(
    store: Store,
    app_id: int,
    delivery_id: uuid.UUID,
    action: ActionName,
    *,
    by: str = "api",
    now: datetime | None = None,
) -> dict[str, Any]:
    """Apply `action` to one delivery of `app_id` with its event, in one transaction; returns the
    delivery as `get_delivery` does. Raises NotFound or WrongState."""
    act = ACTIONS[action]
    now = now or utcnow()
    with store.write() as conn:
        # FOR UPDATE (PostgreSQL): a worker claiming the row right now finishes first, and we
        # then see it as 'sending'. SQLite's BEGIN IMMEDIATE already serialises writers.
        row = conn.execute(
            _changeable()
            .where(deliveries.c.app_id == app_id, deliveries.c.id == delivery_id)
            .with_for_update(of=deliveries)
        ).first()
        if row is None:
            raise NotFound(f"no delivery {delivery_id}", "id")
        if row.status not in act.sources:
            raise WrongState(_wrong_state(act, row.status), row.status)
        if act.target == "queued" and row.raw_purged_at is not None:
            raise WrongState(
                "the message's body was removed (retention or an erasure): it cannot be sent again",
                row.status,
            )
        _apply(conn, act, [row], now, by)
    return get_delivery(store, app_id, delivery_id)


def change_many(
    store: Store,
    app_id: int,
    action: ActionName,
    where: DeliveryFilter,
    *,
    by: str = "api",
    now: datetime | None = None,
    chunk: int = CHUNK,
) -> int:
    """Apply `action` to every delivery of `app_id` matching `where`, `chunk` rows per
    transaction (each change with its event); returns how many changed. Rows being sent are
    skipped, and so are rows another transaction holds locked (PostgreSQL: SKIP LOCKED).
    Raises BadFilter for an empty filter or a status the action does not apply to."""
    act = ACTIONS[action]
    now = now or utcnow()
    if where.is_empty():
        raise BadFilter(
            "give at least one of status, recipient_domain, tag, older_than_seconds, ids "
            f"(to {act.name} every such delivery, name the status)"
        )
    statuses = tuple(where.status) if where.status is not None else act.sources
    for status in statuses:
        if status not in act.sources:
            raise BadFilter(
                f"{act.name} applies to {_states(act.sources)} deliveries, not {status!r}",
                "status",
            )
    conditions = [deliveries.c.app_id == app_id, deliveries.c.status.in_(statuses)]
    if act.target == "queued":  # a message whose body is gone cannot be sent again
        conditions.append(messages.c.raw_purged_at.is_(None))
    conditions += _matching(where.recipient_domain, where.tag)
    if where.older_than_seconds is not None:
        cutoff = now - timedelta(seconds=where.older_than_seconds)
        conditions.append(deliveries.c.first_queued_at <= cutoff)
    if where.ids is not None:
        if not where.ids:
            return 0
        conditions.append(deliveries.c.id.in_(list(where.ids)))
    if where.message_id is not None:
        conditions.append(deliveries.c.message_id == where.message_id)
    changed = 0
    after: uuid.UUID | None = None
    while True:
        query = _changeable().where(*conditions)
        if after is not None:
            query = query.where(deliveries.c.id > after)  # keyset: each row is looked at once
        query = query.order_by(deliveries.c.id).limit(chunk)
        with store.write() as conn:
            rows = conn.execute(query.with_for_update(of=deliveries, skip_locked=True)).all()
            if rows:
                _apply(conn, act, rows, now, by)
        changed += len(rows)
        if len(rows) < chunk:
            return changed
        after = rows[-1].id


def _changeable() -> Any:
    return select(
        deliveries.c.id,
        deliveries.c.app_id,
        deliveries.c.message_id,
        deliveries.c.recipient,
        deliveries.c.status,
        messages.c.stream,
        messages.c.tag,
        messages.c.template,
        messages.c.raw_purged_at,
    ).join(messages, messages.c.id == deliveries.c.message_id)


def _apply(conn: Connection, act: Action, rows: Sequence[Row[Any]], now: datetime, by: str) -> None:
    """Change `rows` (locked, all in `act.sources`) and record their events."""
    by_status: dict[str, list[uuid.UUID]] = defaultdict(list)
    for row in rows:
        by_status[row.status].append(row.id)
    for status, ids in by_status.items():
        values: dict[str, Any] = {
            "status": act.target,
            "lease_owner": None,
            "lease_until": None,
            "updated_at": now,
        }
        if act.target == "queued":
            values.update(next_attempt_at=now, error=None)
            if status == "failed":
                # A fresh max-age window: else an expired delivery would fail again at once.
                values["first_queued_at"] = now
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(ids), deliveries.c.status == status)
            .values(**values)
        )
    record(
        conn,
        [
            Event(
                app_id=row.app_id,
                type=_event_type(act, row.status),
                stream=row.stream,
                tag=row.tag,
                template=row.template,
                message_id=row.message_id,
                delivery_id=row.id,
                recipient=row.recipient,
                data={"action": act.name, "previous_status": row.status, "by": by},
                at=now,
            )
            for row in rows
        ],
    )


def _event_type(act: Action, previous: str) -> EventType:
    if act.target == "cancelled":
        return EventType.DELIVERY_CANCELLED
    if previous == "held":  # out of a hold, whether by release or retry
        return EventType.DELIVERY_RELEASED
    # Back in the queue after a deferral or failure: not delivery.queued, which counts a
    # recipient taken in, so a retried delivery is not counted twice in the statistics.
    return EventType.DELIVERY_RETRIED


def _wrong_state(act: Action, status: str) -> str:
    if status == "sending":
        return (
            f"the delivery is sending right now; {act.name} applies to {_states(act.sources)} "
            "deliveries (try again once this attempt is recorded)"
        )
    return f"the delivery is {status}; {act.name} applies to {_states(act.sources)} deliveries"


def _states(statuses: Sequence[str]) -> str:
    return statuses[0] if len(statuses) == 1 else ", ".join(statuses[:-1]) + " or " + statuses[-1]


def _matching(recipient_domain: str | None, tag: str | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if recipient_domain is not None:
        conditions.append(
            deliveries.c.recipient_domain == recipient_domain.strip().lower().rstrip(".")
        )
    if tag is not None:
        conditions.append(messages.c.tag == tag)
    return conditions


# -- the queue view -----------------------------------------------------------------------------


def _view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "message_id": row.message_id,
        "recipient": row.recipient,
        "recipient_domain": row.recipient_domain,
        "status": row.status,
        "attempts": row.attempts,
        "first_queued_at": row.first_queued_at,
        "next_attempt_at": row.next_attempt_at if row.status in _WILL_BE_TRIED else None,
        "last_attempt_at": row.last_attempt_at,
        "last_reply": row.last_reply,
        "mx": row.mx,
        "error": row.error,
        "tag": row.tag,
        "stream": row.stream,
        "subject": row.subject,
    }


def _viewed() -> Any:
    return select(deliveries, messages.c.tag, messages.c.stream, messages.c.subject).join(
        messages, messages.c.id == deliveries.c.message_id
    )


def get_delivery(store: Store, app_id: int, delivery_id: uuid.UUID) -> dict[str, Any]:
    """One delivery as the queue view shows it; raises NotFound."""
    with store.read() as conn:
        row = conn.execute(
            _viewed().where(deliveries.c.app_id == app_id, deliveries.c.id == delivery_id)
        ).first()
    if row is None:
        raise NotFound(f"no delivery {delivery_id}", "id")
    return _view(row)


def list_deliveries(
    store: Store,
    app_id: int,
    *,
    status: Sequence[str] | None = None,
    recipient_domain: str | None = None,
    tag: str | None = None,
    cursor: uuid.UUID | None = None,
    limit: int = 50,
) -> tuple[list[dict[str, Any]], uuid.UUID | None]:
    """A page of the app's deliveries, oldest first (keyset on the time-ordered id), and the
    cursor for the next page (None on the last). `status` defaults to QUEUE_STATUSES."""
    statuses = tuple(status) if status else QUEUE_STATUSES
    for name in statuses:
        if name not in DELIVERY_STATUSES:
            raise BadFilter(f"unknown status {name!r}", "status")
    query = _viewed().where(
        deliveries.c.app_id == app_id,
        deliveries.c.status.in_(statuses),
        *_matching(recipient_domain, tag),
    )
    if cursor is not None:
        query = query.where(deliveries.c.id > cursor)
    query = query.order_by(deliveries.c.id).limit(limit + 1)
    with store.read() as conn:
        rows = conn.execute(query).all()
        page = rows[:limit]
        reasons = _hold_reasons(conn, [r.id for r in page if r.status == "held"])
    return [{**_view(r), "hold_reason": reasons.get(r.id)} for r in page], page[-1].id if len(
        rows
    ) > limit else None


def _hold_reasons(conn: Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Why each of these held deliveries is held: the reason of its latest `delivery.held`
    event (index: events.delivery_id)."""
    if not ids:
        return {}
    found: dict[uuid.UUID, str] = {}
    for row in conn.execute(
        select(events.c.delivery_id, events.c.data)
        .where(events.c.delivery_id.in_(list(ids)), events.c.type == str(EventType.DELIVERY_HELD))
        .order_by(events.c.created_at, events.c.id)
    ):
        reason = (row.data or {}).get("reason")
        if reason:
            found[row.delivery_id] = str(reason)
    return found


def queue_summary(store: Store, app_id: int, *, now: datetime | None = None) -> dict[str, Any]:
    """What waits in the app's queue: counts per status; deferred and held deliveries grouped
    by recipient domain and by last reply (its first REPLY_CHARS characters), the largest
    TOP_GROUPS groups first; and the age of the oldest undelivered (queued or deferred) one."""
    now = now or utcnow()
    mine = deliveries.c.app_id == app_id
    # Inline constants: PostgreSQL matches GROUP BY expressions textually, and two bound
    # parameters ($1, $3) would not be the same expression.
    reply = func.substr(
        deliveries.c.last_reply, literal_column("1"), literal_column(str(REPLY_CHARS))
    )
    with store.read() as conn:
        counts: dict[str, int] = {
            status: int(n)
            for status, n in conn.execute(
                select(deliveries.c.status, func.count())
                .where(mine, deliveries.c.status.in_(QUEUE_STATUSES))
                .group_by(deliveries.c.status)
            )
        }
        oldest = conn.execute(
            select(func.min(deliveries.c.first_queued_at)).where(
                mine, deliveries.c.status.in_(("queued", "deferred"))
            )
        ).scalar()
        groups: dict[str, dict[str, Any]] = {}
        for status in ("deferred", "held"):
            by_domain = conn.execute(
                select(deliveries.c.recipient_domain, func.count().label("n"))
                .where(mine, deliveries.c.status == status)
                .group_by(deliveries.c.recipient_domain)
                .order_by(func.count().desc(), deliveries.c.recipient_domain)
                .limit(TOP_GROUPS)
            ).all()
            by_reply = conn.execute(
                select(reply.label("reply"), func.count().label("n"))
                .where(mine, deliveries.c.status == status)
                .group_by(reply)
                .order_by(func.count().desc(), reply)
                .limit(TOP_GROUPS)
            ).all()
            groups[status] = {
                "count": counts.get(status, 0),
                "by_recipient_domain": [
                    {"recipient_domain": d, "count": int(n)} for d, n in by_domain
                ],
                "by_last_reply": [{"last_reply": r, "count": int(n)} for r, n in by_reply],
            }
    return {
        "counts": {status: counts.get(status, 0) for status in QUEUE_STATUSES},
        "oldest_queued_seconds": (now - oldest).total_seconds() if oldest is not None else None,
        "deferred": groups["deferred"],
        "held": groups["held"],
    }
