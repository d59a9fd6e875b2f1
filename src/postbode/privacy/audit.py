"""Audit records of access to personal data and of privacy actions (who, when, what, from
which IP), written by the CLI, the API and the UI into the one audit log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert

from postbode.store.schema import audit_log

# The actions that record access to personal data (the audit page can filter on `access.`).
VIEW_MESSAGE = "access.message"  # a message's content, headers, attempts and transcripts
VIEW_RAW = "access.message_raw"  # the raw source downloaded
EXPORT_CSV = "access.export_csv"  # a CSV export of the message log or a suppression list
ERASE = "privacy.erase"
EXPORT_PERSON = "privacy.export"
RETENTION = "privacy.retention"  # retention windows or body storage changed


@dataclass(frozen=True)
class Actor:
    """Who acts: a user of the UI (with their id), an API key's app, or the command line."""

    name: str  # a user's e-mail, `api:<app>`, `cli`
    user_id: int | None = None
    ip: str | None = None


def write_audit(
    conn: Connection,
    actor: Actor,
    action: str,
    target: str = "",
    data: Mapping[str, Any] | None = None,
    *,
    organization_id: int | None,
) -> None:
    """One audit record, in the caller's transaction."""
    conn.execute(
        insert(audit_log).values(
            organization_id=organization_id,
            user_id=actor.user_id,
            actor=actor.name[:320],
            action=action,
            target=target[:200],
            data=dict(data or {}),
            ip=actor.ip,
        )
    )
