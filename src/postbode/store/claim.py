"""Leased queues: claim due rows, renew and release leases, sweep the ones a dead worker left."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    Table,
    Update,
    and_,
    bindparam,
    select,
    true,
    update,
)

from postbode.store.engine import Store
from postbode.store.schema import deliveries, inbound_messages, utcnow, webhook_requests


@dataclass(frozen=True)
class Queue:
    """A table used as a queue: which statuses are due, and what a claimed row is called."""

    table: Table
    due: tuple[str, ...]
    claimed: str
    # where a swept row goes back to (its lease expired: the worker died mid-flight)
    swept: str
    # where a row goes when a bug broke its handling, and the column that keeps the error for
    # the UI (which can retry it): out of the queue, never silently dropped
    parked: str
    error_column: str


DELIVERIES = Queue(
    deliveries,
    due=("scheduled", "queued", "deferred"),
    claimed="sending",
    swept="deferred",
    parked="held",
    error_column="error",
)
WEBHOOK_REQUESTS = Queue(
    webhook_requests,
    due=("pending",),
    claimed="sending",
    swept="pending",
    parked="failed",
    error_column="last_error",
)
INBOUND = Queue(
    inbound_messages,
    due=("pending",),
    claimed="sending",
    swept="pending",
    parked="failed",
    error_column="last_error",
)


def claim(
    store: Store,
    queue: Queue,
    owner: str,
    limit: int,
    lease: timedelta,
    *,
    now: datetime | None = None,
    where: ColumnElement[bool] | None = None,
) -> Sequence[Row[Any]]:
    """Lease up to `limit` due rows to `owner`, oldest due first, and return them.

    PostgreSQL: concurrent claimers skip each other's locked rows (FOR UPDATE SKIP LOCKED).
    SQLite: the write transaction is BEGIN IMMEDIATE, so claimers are serialised.
    """
    now = now or utcnow()
    params = {"_now": now, "_limit": limit, "_owner": owner, "_until": now + lease}
    if where is None:  # the runners' claim: built once per queue and dialect
        stmt = _claim_statement(queue, store.is_sqlite)
    else:
        stmt = _build_claim(queue, store.is_sqlite, where)
    with store.write() as conn:
        return conn.execute(stmt, params).all()


@functools.cache
def _claim_statement(queue: Queue, is_sqlite: bool) -> Update:
    return _build_claim(queue, is_sqlite, None)


def _build_claim(queue: Queue, is_sqlite: bool, where: ColumnElement[bool] | None) -> Update:
    """The claim's UPDATE … RETURNING, its values as parameters: `_now`, `_limit`, `_owner`,
    `_until` (the lease's end)."""
    t = queue.table
    due = select(t.c.id).where(
        t.c.status.in_(queue.due),
        t.c.next_attempt_at <= bindparam("_now"),
        where if where is not None else true(),
    )
    due = due.order_by(t.c.next_attempt_at).limit(bindparam("_limit", type_=Integer))
    if not is_sqlite:
        due = due.with_for_update(skip_locked=True)
    return (
        update(t)
        .where(t.c.id.in_(due.scalar_subquery()))
        .values(
            status=queue.claimed, lease_owner=bindparam("_owner"), lease_until=bindparam("_until")
        )
        .returning(*t.c)
    )


def renew(store: Store, queue: Queue, owner: str, ids: Sequence[Any], lease: timedelta) -> int:
    """Extend the lease on rows `owner` still holds; returns how many it still holds."""
    if not ids:
        return 0
    t = queue.table
    held = select(t.c.id).where(_held_by(queue, owner), t.c.id.in_(ids))
    if not store.is_sqlite:
        # Rows being released right now are locked by their recorder: skip them rather than
        # wait, which could deadlock against a recorder locking the same rows in another order.
        held = held.with_for_update(skip_locked=True)
    with store.write() as conn:
        result = conn.execute(
            update(t).where(t.c.id.in_(held.scalar_subquery())).values(lease_until=utcnow() + lease)
        )
        return result.rowcount


def release(store: Store, queue: Queue, owner: str, row_id: Any, **values: Any) -> bool:
    """End `owner`'s lease on one row, writing its outcome (status and other columns).

    False when the lease was lost (expired and claimed by another worker): the caller must not
    record anything else about the row then."""
    with store.write() as conn:
        return release_in(conn, queue, owner, row_id, **values)


def release_in(conn: Any, queue: Queue, owner: str, row_id: Any, **values: Any) -> bool:
    """`release` inside the caller's transaction, so the outcome and its events commit together."""
    values.setdefault("status", queue.swept)
    result = conn.execute(_release_statement(queue), {"_owner": owner, "_id": row_id, **values})
    return bool(result.rowcount == 1)


def release_many(
    conn: Any, queue: Queue, owner: str, outcomes: Sequence[tuple[Any, dict[str, Any]]]
) -> int:
    """`release_in` for many rows at once, each `(row id, values)`: one executemany per set of
    columns written. Returns how many of the rows `owner` still held (and so released); when
    that is fewer than given, the caller should roll back and release them one by one to learn
    which lease was lost."""
    groups: defaultdict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for row_id, values in outcomes:
        params = {"status": queue.swept, **values, "_owner": owner, "_id": row_id}
        groups[tuple(sorted(params))].append(params)
    statement = _release_statement(queue)
    released = 0
    for params_list in groups.values():
        if conn.dialect.supports_sane_multi_rowcount:
            released += conn.execute(statement, params_list).rowcount
        else:  # the driver cannot count an executemany: one statement each
            released += sum(conn.execute(statement, p).rowcount for p in params_list)
    return released


def park(store: Store, queue: Queue, owner: str, ids: Sequence[Any], error: str) -> int:
    """Rows of `ids` still leased to `owner` leave the queue for its parked status, keeping
    `error` for the UI; returns how many. Rows already released are left as they are."""
    if not ids:
        return 0
    t = queue.table
    with store.write() as conn:
        result = conn.execute(
            update(t)
            .where(_held_by(queue, owner), t.c.id.in_(list(ids)))
            .values(
                {
                    t.c.status: queue.parked,
                    t.c[queue.error_column]: error,
                    t.c.lease_owner: None,
                    t.c.lease_until: None,
                }
            )
        )
        return result.rowcount


def hand_back(store: Store, queue: Queue, owner: str, ids: Sequence[Any]) -> int:
    """Rows of `ids` still leased to `owner` go back to the queue, due now (a worker stopping
    with work in hand); returns how many. Rows already released are left as they are."""
    if not ids:
        return 0
    t = queue.table
    with store.write() as conn:
        result = conn.execute(
            update(t)
            .where(_held_by(queue, owner), t.c.id.in_(list(ids)))
            .values(
                status=queue.swept, lease_owner=None, lease_until=None, next_attempt_at=utcnow()
            )
        )
        return result.rowcount


@functools.cache
def _release_statement(queue: Queue) -> Update:
    """End a lease: `_owner` and `_id` pick the row; the columns to write come as parameters
    (built once: constructing the statement per row cost more than running it)."""
    t = queue.table
    return (
        update(t)
        .where(
            t.c.status == queue.claimed,
            t.c.lease_owner == bindparam("_owner"),
            t.c.id == bindparam("_id"),
        )
        .values(lease_owner=None, lease_until=None)
    )


def sweep(store: Store, queue: Queue, *, now: datetime | None = None) -> int:
    """Return rows whose lease expired to the queue; returns how many."""
    now = now or utcnow()
    t = queue.table
    expired = select(t.c.id).where(t.c.status == queue.claimed, t.c.lease_until < now)
    if not store.is_sqlite:
        expired = expired.with_for_update(skip_locked=True)  # as in renew: never deadlock
    with store.write() as conn:
        result = conn.execute(
            update(t)
            .where(t.c.id.in_(expired.scalar_subquery()))
            .values(status=queue.swept, lease_owner=None, lease_until=None, next_attempt_at=now)
        )
        return result.rowcount


def _held_by(queue: Queue, owner: str) -> ColumnElement[bool]:
    t = queue.table
    return and_(t.c.status == queue.claimed, t.c.lease_owner == owner)
