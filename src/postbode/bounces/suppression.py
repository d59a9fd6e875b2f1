"""The suppression list: addresses an app must not send to, and why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row
from sqlalchemy.dialects import postgresql, sqlite

from postbode.bounces.classify import Classification
from postbode.store.schema import suppressions, utcnow


def suppress(
    conn: Connection,
    app_id: int,
    email: str,
    *,
    reason: str,
    source: str,
    stream: str = "all",
    message_id: Any = None,
    detail: str | None = None,
    expires_at: datetime | None = None,
) -> None:
    """Put an address on the app's list (in the caller's transaction); an existing entry for
    the same address and stream is kept as it is."""
    dialect = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(
        dialect.insert(suppressions)
        .values(
            app_id=app_id,
            email=email.lower(),
            stream=stream,
            reason=reason,
            source=source,
            message_id=message_id,
            detail=(detail or "")[:2000] or None,
            expires_at=expires_at,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["app_id", "email", "stream"])
    )


def suppress_after_bounce(
    conn: Connection,
    delivery: Row[Any],
    message: Row[Any],
    found: Classification,
    detail: str,
) -> None:
    """A hard bounce (the address is bad) suppresses it for good; a soft one never does here
    (a reputation block must not cost the recipient their mail)."""
    if found.hard:
        suppress(
            conn,
            delivery.app_id,
            delivery.recipient,
            reason=found.category,
            source="bounce",
            message_id=delivery.message_id,
            detail=detail,
        )
