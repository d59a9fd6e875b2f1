"""The audit log: who changed what in an organization, to which target, when and from where."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, insert

from postbode.store.schema import audit_log


def write(
    conn: Connection,
    organization_id: int | None,
    actor: str,
    action: str,
    target: str = "",
    data: Mapping[str, Any] | None = None,
    *,
    ip: str | None = None,
    user_id: int | None = None,
) -> None:
    """One audit row, in the caller's transaction (or its own, for a change already made)."""
    conn.execute(
        insert(audit_log).values(
            organization_id=organization_id,
            user_id=user_id,
            actor=actor[:320],
            action=action[:64],
            target=target[:200],
            data=dict(data or {}),
            ip=ip,
        )
    )
