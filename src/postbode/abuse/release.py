"""Releasing a held app: its hold ends and its held mail is sent through the queue operations
(delivery/manage.py). Apart from `hold`, which the accept path imports, so that accepting mail
never depends on delivery."""

from __future__ import annotations

import uuid

from sqlalchemy import or_, select, update

from postbode import audit
from postbode.abuse.content import HOLD_PREFIX
from postbode.abuse.hold import Actor, app_row, note_release
from postbode.delivery.manage import CHUNK, DeliveryFilter, change_many
from postbode.store.engine import Store
from postbode.store.schema import apps, deliveries, utcnow

__all__ = ["release"]


def release(store: Store, app_id: int, actor: Actor) -> int:
    """End the app's hold and send its held mail; returns how many deliveries were released.
    Deliveries parked by an error (they carry a traceback) stay held: they are released one by
    one from the queue view, once the error is understood; so do those held for their content
    (abuse/content.py), which a person judges message by message. Releasing an app that is not
    held sends whatever an earlier, interrupted release left held. Raises HoldError (no such
    app)."""
    with store.write() as conn:
        app = app_row(conn, app_id)
        conn.execute(
            update(apps)
            .where(apps.c.id == app_id)
            .values(hold_reason=None, held_at=None, held_by=None)
        )
        note_release(conn, app_id, utcnow())
        audit.write(
            conn,
            app.organization_id,
            actor.name,
            "app.release",
            app.name,
            {"reason": app.hold_reason} if app.hold_reason else {},
            ip=actor.ip,
            user_id=actor.user_id,
        )
    released = 0
    after: uuid.UUID | None = None
    while True:
        query = select(deliveries.c.id).where(
            deliveries.c.app_id == app_id,
            deliveries.c.status == "held",
            deliveries.c.error.is_(None),
            or_(
                deliveries.c.last_reply.is_(None),
                ~deliveries.c.last_reply.startswith(HOLD_PREFIX, autoescape=True),
            ),
        )
        if after is not None:
            query = query.where(deliveries.c.id > after)
        with store.read() as conn:
            ids = list(conn.execute(query.order_by(deliveries.c.id).limit(CHUNK)).scalars())
        if not ids:
            break
        released += change_many(
            store, app_id, "release", DeliveryFilter(ids=ids), by=actor.name, chunk=CHUNK
        )
        after = ids[-1]
    return released
