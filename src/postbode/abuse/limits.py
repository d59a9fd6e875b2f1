"""Sending limits per app and per credential (messages accepted per minute, hour and day),
counted in the store so they hold across listener processes and nodes."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from postbode.abuse import alerts
from postbode.store.engine import Store
from postbode.store.schema import apps, credentials, send_counters, utcnow

__all__ = [
    "PERIODS",
    "Gate",
    "Limits",
    "Over",
    "credential_lookup",
    "get_limits",
    "purge_counters",
    "set_limits",
]

# Fixed windows, aligned on the epoch in UTC: the counter of the window a message falls in.
PERIODS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
CACHE_SECONDS = 5.0  # a changed limit takes effect on every node within this time
MAX_LIMIT = 2**31 - 1  # an INTEGER column on PostgreSQL
KEEP_COUNTERS = timedelta(days=2)  # counter rows older than this are purged


@dataclass(frozen=True)
class Limits:
    """Messages accepted per window; None: no limit."""

    per_minute: int | None = None
    per_hour: int | None = None
    per_day: int | None = None

    def items(self) -> list[tuple[str, int]]:
        """(period, limit) of the limits set."""
        values = {"minute": self.per_minute, "hour": self.per_hour, "day": self.per_day}
        return [(period, limit) for period, limit in values.items() if limit is not None]

    def as_json(self) -> dict[str, int | None]:
        return {
            "per_minute": self.per_minute,
            "per_hour": self.per_hour,
            "per_day": self.per_day,
        }


@dataclass(frozen=True)
class Over:
    """A message refused by a limit: which one, and when its window ends."""

    scope: str  # app | credential
    name: str  # the app's name, or the credential's lookup
    period: str  # minute | hour | day
    limit: int
    retry_after: int  # seconds until the window ends

    @property
    def message(self) -> str:
        return (
            f"sending limit reached: {self.limit} messages per {self.period} for "
            f"{self.scope} {self.name}; try again in {self.retry_after} s"
        )

    @property
    def field(self) -> str:
        return f"per_{self.period}"


def credential_lookup(api_key: str) -> str | None:
    """The public part of an API key (`pb_<lookup>_<secret>`): the credential's lookup."""
    if not api_key.startswith("pb_"):
        return None
    lookup, sep, _ = api_key[3:].partition("_")
    return lookup if sep and lookup else None


def window(at: datetime, period: str) -> tuple[datetime, int]:
    """The start of the window `at` falls in, and the seconds left in it (at least 1)."""
    seconds = PERIODS[period]
    epoch = at.timestamp()
    start = math.floor(epoch / seconds) * seconds
    left = max(1, math.ceil(start + seconds - epoch))
    return datetime.fromtimestamp(start, at.tzinfo), left


def _limits(row: Any) -> Limits:
    return Limits(row.limit_per_minute, row.limit_per_hour, row.limit_per_day)


def get_limits(conn: Connection, app_id: int, credential_id: int | None = None) -> Limits:
    """The limits of an app (or, with `credential_id`, of that credential of the app)."""
    table = credentials if credential_id is not None else apps
    key = credential_id if credential_id is not None else app_id
    query = select(table.c.limit_per_minute, table.c.limit_per_hour, table.c.limit_per_day).where(
        table.c.id == key
    )
    if credential_id is not None:
        query = query.where(credentials.c.app_id == app_id)
    row = conn.execute(query).first()
    if row is None:
        raise LookupError("no such credential" if credential_id is not None else "no such app")
    return _limits(row)


def set_limits(
    conn: Connection,
    app_id: int,
    changes: Mapping[str, int | None],
    credential_id: int | None = None,
) -> Limits:
    """Set some of per_minute, per_hour, per_day (None or 0 removes one: to stop all mail,
    hold or suspend the app); returns the limits after. ValueError names a bad one."""
    for name, value in changes.items():
        if name not in ("per_minute", "per_hour", "per_day"):
            raise ValueError(f"unknown limit {name!r}")
        if value is not None and not 0 <= value <= MAX_LIMIT:
            raise ValueError(f"{name} is a count of messages: 0 (no limit) to {MAX_LIMIT}")
    changes = {name: value or None for name, value in changes.items()}
    table = credentials if credential_id is not None else apps
    key = credential_id if credential_id is not None else app_id
    if changes:
        conn.execute(
            update(table)
            .where(table.c.id == key)
            # another app's credential is never changed, whatever id is given
            .where(*([credentials.c.app_id == app_id] if credential_id is not None else []))
            .values({f"limit_{name}": value for name, value in changes.items()})
        )
    return get_limits(conn, app_id, credential_id)


def _bump_statement(dialect: Any) -> Any:
    stmt = dialect.insert(send_counters)
    return stmt.on_conflict_do_update(
        index_elements=["scope", "period", "bucket"],
        set_={"count": send_counters.c.count + stmt.excluded.count},
    ).returning(send_counters.c.count)


_BUMP = {"sqlite": _bump_statement(sqlite), "postgresql": _bump_statement(postgresql)}


@dataclass(frozen=True)
class _Scoped:
    """The limits of one scope (an app, a credential) as the gate caches them."""

    key: str  # app:ID | credential:ID: the counters' scope
    scope: str  # app | credential
    name: str
    limits: Limits
    app_id: int
    loaded_at: float


class Gate:
    """Takes a batch of messages' places in their app's and credential's windows, in one
    transaction; the messages over a limit are refused and take no place."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._apps: dict[int, _Scoped] = {}
        self._credentials: dict[str, _Scoped | None] = {}
        self._loaded: dict[str, float] = {}
        self._lock = threading.Lock()

    def _scopes(self, app_id: int, credential: str | None) -> list[_Scoped]:
        now = time.monotonic()
        with self._lock:
            app = self._apps.get(app_id)
            cred = self._credentials.get(credential or "")
            cred_fresh = credential is None or now - self._loaded.get(credential, -1e9) < (
                CACHE_SECONDS
            )
        if app is None or now - app.loaded_at > CACHE_SECONDS or not cred_fresh:
            app, cred = self._load(app_id, credential, now)
        return [s for s in (app, cred) if s is not None and s.limits.items()]

    def _load(
        self, app_id: int, credential: str | None, now: float
    ) -> tuple[_Scoped, _Scoped | None]:
        with self.store.read() as conn:
            row = conn.execute(
                select(
                    apps.c.name,
                    apps.c.limit_per_minute,
                    apps.c.limit_per_hour,
                    apps.c.limit_per_day,
                ).where(apps.c.id == app_id)
            ).first()
            # An app deleted meanwhile has no limits: storing its message fails on its own.
            found = _limits(row) if row is not None else Limits()
            name = row.name if row is not None else str(app_id)
            app = _Scoped(f"app:{app_id}", "app", name, found, app_id, now)
            cred: _Scoped | None = None
            if credential:
                c = conn.execute(
                    select(
                        credentials.c.id,
                        credentials.c.limit_per_minute,
                        credentials.c.limit_per_hour,
                        credentials.c.limit_per_day,
                    ).where(credentials.c.lookup == credential, credentials.c.app_id == app_id)
                ).first()
                if c is not None:
                    cred = _Scoped(
                        f"credential:{c.id}", "credential", credential, _limits(c), app_id, now
                    )
        with self._lock:
            if len(self._credentials) > 10_000:
                self._credentials.clear()
                self._loaded.clear()
            self._apps[app_id] = app
            if credential:
                self._credentials[credential] = cred
                self._loaded[credential] = now
        return app, cred

    def take(
        self, items: Sequence[tuple[int, str | None]], now: datetime | None = None
    ) -> list[Over | None]:
        """For each (app id, credential lookup) of a batch, in order: None (counted, go on) or
        the limit it is over (not counted). No write at all when no limit applies."""
        scoped = [self._scopes(app_id, credential) for app_id, credential in items]
        answers: list[Over | None] = [None] * len(items)
        if not any(scoped):
            return answers
        now = now or utcnow()
        # (scope key, period, bucket) -> the batch's items counted there, in order
        groups: dict[tuple[str, str, datetime], list[int]] = defaultdict(list)
        meta: dict[tuple[str, str, datetime], tuple[_Scoped, int, int]] = {}
        for i, scopes in enumerate(scoped):
            for s in scopes:
                for period, limit in s.limits.items():
                    bucket, left = window(now, period)
                    key = (s.key, period, bucket)
                    groups[key].append(i)
                    meta[key] = (s, limit, left)
        over_by: dict[int, Over] = {}
        with self.store.write() as conn:
            bump = _BUMP[conn.dialect.name]
            counted: dict[tuple[str, str, datetime], list[int]] = {}
            # In key order: two writers lock shared counter rows in the same order (PostgreSQL).
            for key in sorted(groups):
                members = groups[key]
                s, limit, left = meta[key]
                total = conn.execute(
                    bump.values(scope=key[0], period=key[1], bucket=key[2], count=len(members))
                ).scalar_one()
                room = max(0, limit - (total - len(members)))
                counted[key] = members
                for i in members[room:]:
                    if i not in over_by:
                        over_by[i] = Over(s.scope, s.name, key[1], limit, left)
            if over_by:
                # The refused take no place: give back what they took in every window.
                for key, members in counted.items():
                    refused = sum(1 for i in members if i in over_by)
                    if refused:
                        conn.execute(
                            update(send_counters)
                            .where(
                                send_counters.c.scope == key[0],
                                send_counters.c.period == key[1],
                                send_counters.c.bucket == key[2],
                            )
                            .values(count=send_counters.c.count - refused)
                        )
                self._alert(conn, over_by, scoped, now)
        for i, over in over_by.items():
            answers[i] = over
        return answers

    @staticmethod
    def _alert(
        conn: Connection, over_by: dict[int, Over], scoped: list[list[_Scoped]], now: datetime
    ) -> None:
        """One `limit` alert per app and hour (alerts.py keeps the count)."""
        seen: set[int] = set()
        for i, over in over_by.items():
            app_id = scoped[i][0].app_id
            if app_id in seen:
                continue
            seen.add(app_id)
            figures = {
                "scope": over.scope,
                "name": over.name,
                "period": over.period,
                "limit": over.limit,
                "refused_in_batch": sum(1 for j in over_by if scoped[j][0].app_id == app_id),
            }
            alerts.raise_alert_in(conn, app_id, "limit", figures, now=now)


def purge_counters(store: Store, now: datetime | None = None) -> int:
    """Delete counter rows of windows that ended long ago; returns how many."""
    cutoff = (now or utcnow()) - KEEP_COUNTERS
    with store.write() as conn:
        return int(
            conn.execute(delete(send_counters).where(send_counters.c.bucket < cutoff)).rowcount
        )
