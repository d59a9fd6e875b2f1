"""Holding an app's mail: while an app is held its new mail is accepted with
status `held` (and its hold reason) and its queued mail is not sent; a release (release.py)
sends it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, update

from postbode import audit
from postbode.store.engine import Store
from postbode.store.schema import apps, stat_counters, system_values, utcnow

__all__ = [
    "REASON_CHARS",
    "Actor",
    "HoldError",
    "Release",
    "app_row",
    "hold",
    "hold_in",
]

REASON_CHARS = 500
_RELEASED = "abuse.released."  # system_values name prefix: when an app was last released


class HoldError(ValueError):
    """A hold or release that cannot be made (no such app, an empty reason)."""


@dataclass(frozen=True)
class Actor:
    """Who holds or releases, as the audit log names them."""

    name: str  # a user's e-mail, `cli`, an organisation token's name, `postbode` (a detector)
    user_id: int | None = None
    ip: str | None = None


DETECTOR = Actor("postbode")


def note_release(conn: Connection, app_id: int, at: datetime) -> None:
    """Remember when the app was released, and what it had sent in that minute so far: the
    guards and the spike check judge only what happened after it (else what tripped them would
    hold the app again at once)."""
    minute = at.replace(second=0, microsecond=0)
    counted = conn.execute(
        select(stat_counters.c.tag, func.sum(stat_counters.c.count))
        .where(
            stat_counters.c.app_id == app_id,
            stat_counters.c.event_type == "message.received",
            stat_counters.c.bucket == minute,
        )
        .group_by(stat_counters.c.tag)
    )
    value = json.dumps({"at": at.isoformat(), "minute": {t or "": int(n) for t, n in counted}})
    name = f"{_RELEASED}{app_id}"
    changed = conn.execute(
        system_values.update().where(system_values.c.name == name).values(value=value)
    ).rowcount
    if not changed:
        conn.execute(system_values.insert().values(name=name, value=value))


@dataclass(frozen=True)
class Release:
    at: datetime
    minute: dict[str, int]  # messages received per tag in the minute of the release, before it


def last_release(conn: Connection, app_ids: list[int]) -> dict[int, Release]:
    """When each of these apps was last released (apps never released are left out)."""
    names = [f"{_RELEASED}{i}" for i in app_ids]
    rows = conn.execute(
        select(system_values.c.name, system_values.c.value).where(system_values.c.name.in_(names))
    )
    found: dict[int, Release] = {}
    for r in rows:
        data = json.loads(r.value)
        found[int(r.name[len(_RELEASED) :])] = Release(
            datetime.fromisoformat(data["at"]), dict(data.get("minute") or {})
        )
    return found


def app_row(conn: Connection, app_id: int) -> Any:
    row = conn.execute(
        select(apps.c.id, apps.c.name, apps.c.organization_id, apps.c.hold_reason).where(
            apps.c.id == app_id
        )
    ).first()
    if row is None:
        raise HoldError(f"no app {app_id}")
    return row


def hold_in(
    conn: Connection,
    app_id: int,
    reason: str,
    actor: Actor = DETECTOR,
    *,
    now: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Hold the app's mail, in `conn`'s transaction, with its audit row; False when the app was
    already held (the first reason stays: it is what tripped)."""
    reason = " ".join(reason.split())[:REASON_CHARS]
    if not reason:
        raise HoldError("give a reason for the hold")
    app = app_row(conn, app_id)
    now = now or utcnow()
    changed = conn.execute(
        update(apps)
        .where(apps.c.id == app_id, apps.c.hold_reason.is_(None))
        .values(hold_reason=reason, held_at=now, held_by=actor.name[:320])
    ).rowcount
    if not changed:
        return False
    audit.write(
        conn,
        app.organization_id,
        actor.name,
        "app.hold",
        app.name,
        {"reason": reason, **(data or {})},
        ip=actor.ip,
        user_id=actor.user_id,
    )
    return True


def hold(store: Store, app_id: int, reason: str, actor: Actor) -> bool:
    """Hold the app's mail (see `hold_in`); False when it was already held."""
    with store.write() as conn:
        return hold_in(conn, app_id, reason, actor)
