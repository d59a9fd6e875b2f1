"""Shaping state every worker process and node shares: per destination domain the token
bucket's schedule and the adaptive slow-down, per MX host leased connection slots.

Two implementations of one small interface: `StoreState` keeps it in the store (the tables
`destination_state` and `connection_slots`), so the limits hold for the whole cluster;
`MemoryState` keeps it in the process (tests, and tools that send on their own).

Times are epoch seconds (`time.time()`): every process reads the same clock, so nodes are
expected to keep theirs in step (NTP); a node whose clock runs ahead books slots late (it
sends more slowly, never faster than allowed).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from postbode.store.engine import Store
from postbode.store.retry import retrying
from postbode.store.schema import connection_slots, destination_state

__all__ = ["DestinationRecord", "MemoryState", "ShapingState", "StoreState"]

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_FORGET = 3600.0  # seconds after which an idle destination's row is removed
PURGE_EVERY = 600.0  # seconds between one process's sweeps of idle rows


@dataclass
class DestinationRecord:
    """What is shared about one recipient domain: the bucket's theoretical arrival time and
    the slow-down (see `shaping.Slowdown`; times in epoch seconds)."""

    tat: float
    low: float = 1.0
    last_signal: float | None = None
    lowered_at: float | None = None
    reason: str = ""
    since: datetime | None = None


class ShapingState(Protocol):
    """Where the shaper keeps what all senders to a destination must agree on."""

    def update(self, domain: str, now: float, change: Callable[[DestinationRecord], T]) -> T:
        """Run `change` on the domain's record (created at `now` if missing) and keep what it
        changed, atomically: no other sender sees or changes the record meanwhile. `change`
        may run more than once (a retried transaction) and must only touch the record."""
        ...

    def peek(self, domain: str) -> DestinationRecord | None:
        """A copy of the domain's record, or None when it has none."""
        ...

    def take_slot(self, host: str, limit: int, holder: str, now: float, lease: float) -> int | None:
        """One of `host`'s `limit` connection slots for `holder` until `now + lease`, or None
        when `limit` are held (expired leases do not count)."""
        ...

    def renew_slot(self, host: str, slot: int, holder: str, until: float) -> bool:
        """Extend a held slot's lease; False when `holder` no longer holds it."""
        ...

    def free_slot(self, host: str, slot: int, holder: str) -> None: ...

    def busy(self, host: str, now: float) -> int:
        """How many of `host`'s slots are held now."""
        ...


class MemoryState:
    """The shaping state of one process (tests; a single sender)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, DestinationRecord] = {}
        self._slots: dict[str, dict[int, tuple[str, float]]] = {}

    def update(self, domain: str, now: float, change: Callable[[DestinationRecord], T]) -> T:
        with self._lock:
            record = self._records.setdefault(domain, DestinationRecord(tat=now))
            return change(record)

    def peek(self, domain: str) -> DestinationRecord | None:
        with self._lock:
            record = self._records.get(domain)
            return copy.copy(record) if record is not None else None

    def take_slot(self, host: str, limit: int, holder: str, now: float, lease: float) -> int | None:
        with self._lock:
            slots = self._slots.setdefault(host, {})
            live = {n for n, (_, until) in slots.items() if until > now}
            if len(live) >= limit:
                return None
            for n in range(limit):
                if n not in live:
                    slots[n] = (holder, now + lease)
                    return n
            return None

    def renew_slot(self, host: str, slot: int, holder: str, until: float) -> bool:
        with self._lock:
            slots = self._slots.get(host, {})
            if slots.get(slot, ("", 0.0))[0] != holder:
                return False
            slots[slot] = (holder, until)
            return True

    def free_slot(self, host: str, slot: int, holder: str) -> None:
        with self._lock:
            slots = self._slots.get(host, {})
            if slots.get(slot, ("", 0.0))[0] == holder:
                del slots[slot]

    def busy(self, host: str, now: float) -> int:
        with self._lock:
            return sum(until > now for _, until in self._slots.get(host, {}).values())


class StoreState:
    """The shaping state in the store, shared by every process on every node.

    One short write transaction per batch booked, per throttling reply, and per connection
    opened and closed; the destination's row is locked (FOR UPDATE on PostgreSQL, SQLite's
    one writer) while a batch books its slots, so two workers never book the same slot.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._insert = sqlite_insert if store.is_sqlite else pg_insert
        self._last_purge = 0.0

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction for shaping state: soft state, so on PostgreSQL its commit
        does not wait for the WAL flush. A database crash may forget the last moment's
        bookings and slots: senders are then briefly a little faster than the limits, and
        no mail is lost."""
        with self.store.write() as conn:
            if not self.store.is_sqlite:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            yield conn

    def update(self, domain: str, now: float, change: Callable[[DestinationRecord], T]) -> T:
        def transaction() -> T:
            with self._write() as conn:
                return self._update(conn, domain, now, change)

        result = retrying(transaction, f"shaping state of {domain}")
        if now - self._last_purge > PURGE_EVERY:
            self._last_purge = now
            retrying(lambda: self._purge(now), "forgetting idle shaping state")
        return result

    def _update(
        self, conn: Connection, domain: str, now: float, change: Callable[[DestinationRecord], T]
    ) -> T:
        t = destination_state
        conn.execute(
            self._insert(t)
            .values(domain=domain, tat=now, used_at=now)
            .on_conflict_do_nothing(index_elements=["domain"])
        )
        row = conn.execute(select(t).where(t.c.domain == domain).with_for_update()).one()
        record = _record(row)
        result = change(record)
        conn.execute(
            update(t)
            .where(t.c.domain == domain)
            .values(
                tat=record.tat,
                slow_low=record.low,
                slow_last_signal=record.last_signal,
                slow_lowered_at=record.lowered_at,
                slow_reason=record.reason[:64],
                slow_since=record.since,
                used_at=now,
            )
        )
        return result

    def peek(self, domain: str) -> DestinationRecord | None:
        t = destination_state
        with self.store.read() as conn:
            row = conn.execute(select(t).where(t.c.domain == domain)).first()
        return _record(row) if row is not None else None

    def take_slot(self, host: str, limit: int, holder: str, now: float, lease: float) -> int | None:
        t = connection_slots

        def transaction() -> int | None:
            with self._write() as conn:
                live = conn.execute(
                    select(func.count()).where(t.c.host == host, t.c.lease_until > now)
                ).scalar_one()
                if live >= limit:  # also after a slow-down lowered the limit below the slots
                    return None
                for n in range(limit):
                    # Free, or held by someone whose lease ran out (a killed worker): ours.
                    # Concurrent takers of one slot queue on its row; the later one finds it
                    # held and tries the next.
                    stmt = (
                        self._insert(t)
                        .values(host=host, slot=n, holder=holder, lease_until=now + lease)
                        .on_conflict_do_update(
                            index_elements=["host", "slot"],
                            set_={"holder": holder, "lease_until": now + lease},
                            where=t.c.lease_until <= now,
                        )
                        .returning(t.c.slot)
                    )
                    if conn.execute(stmt).first() is not None:
                        return n
                return None

        return retrying(transaction, f"a connection slot for {host}")

    def renew_slot(self, host: str, slot: int, holder: str, until: float) -> bool:
        t = connection_slots
        with self._write() as conn:
            renewed = conn.execute(
                update(t)
                .where(t.c.host == host, t.c.slot == slot, t.c.holder == holder)
                .values(lease_until=until)
            ).rowcount
        return bool(renewed)

    def free_slot(self, host: str, slot: int, holder: str) -> None:
        t = connection_slots

        def transaction() -> None:
            with self._write() as conn:
                conn.execute(
                    delete(t).where(t.c.host == host, t.c.slot == slot, t.c.holder == holder)
                )

        retrying(transaction, f"freeing a connection slot for {host}")

    def busy(self, host: str, now: float) -> int:
        t = connection_slots
        with self.store.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(t.c.host == host, t.c.lease_until > now)
                ).scalar_one()
            )

    def _purge(self, now: float) -> None:
        with self._write() as conn:
            d = destination_state
            conn.execute(
                delete(d).where(
                    d.c.used_at < now - IDLE_FORGET,
                    d.c.tat < now,
                    (d.c.slow_last_signal.is_(None)) | (d.c.slow_last_signal < now - IDLE_FORGET),
                )
            )
            s = connection_slots
            conn.execute(delete(s).where(s.c.lease_until < now - IDLE_FORGET))


def _record(row: object) -> DestinationRecord:
    return DestinationRecord(
        tat=row.tat,  # type: ignore[attr-defined]
        low=row.slow_low,  # type: ignore[attr-defined]
        last_signal=row.slow_last_signal,  # type: ignore[attr-defined]
        lowered_at=row.slow_lowered_at,  # type: ignore[attr-defined]
        reason=row.slow_reason,  # type: ignore[attr-defined]
        since=row.slow_since,  # type: ignore[attr-defined]
    )
