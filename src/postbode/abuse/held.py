"""Which apps are held and what their held deliveries say: the read side of an app hold, for
the accept path and the sender, which must not depend on the queue operations in `hold`."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, select

from postbode.store.schema import apps

__all__ = ["holds", "reply_text"]


def reply_text(reason: str) -> str:
    """What a delivery held by an app hold shows as its last reply (queue view, message page)."""
    return f"app held: {reason}"


_HELD = select(apps.c.id, apps.c.hold_reason).where(
    apps.c.id.in_(bindparam("ids", expanding=True)), apps.c.hold_reason.is_not(None)
)  # built once: it is read by every group commit


def holds(conn: Connection, app_ids: Iterable[int]) -> dict[int, str]:
    """The hold reason of each of these apps that is held."""
    ids = sorted(set(app_ids))
    if not ids:
        return {}
    rows = conn.execute(_HELD, {"ids": ids})
    return {r.id: r.hold_reason for r in rows}
