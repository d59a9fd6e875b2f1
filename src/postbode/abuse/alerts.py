"""Alerts about an app (`app.alert`): recorded with the figures that tripped them and what was
held, sent to webhooks with the other events, listed in the UI and e-mailed to the
organisation's owners and admins, at most once per kind, app and hour on any number of nodes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.ingest.system_mail import SYSTEM_SOURCE, queue_system_mail
from postbode.store.engine import Store
from postbode.store.schema import (
    UTCDateTime,
    alert_state,
    app_alerts,
    apps,
    memberships,
    users,
    utcnow,
)

__all__ = ["ALERT_INTERVAL", "KINDS", "SYSTEM_SOURCE", "raise_alert", "raise_alert_in", "recent"]

# The kinds of `app.alert`: the same strings in webhooks, the API and the UI.
KINDS = (
    "limit",  # a sending limit refused mail
    "spike",  # the sending rate far above the app's own baseline
    "bounce_rate",
    "complaint_rate",
    "list_bombing",  # many never-seen addresses at one domain, most unknown there
    "content",  # a content scanner's score
    "volume_drop",
    "volume_spike",
    "delivery_rate_drop",
)
ALERT_INTERVAL = timedelta(hours=1)  # at most one alert per kind and app in this time
ALERT_TAG = "postbode-alert"
# messages.source of mail Postbode writes itself: an app hold does not hold it, so the people
# told about a hold hear of it.


def _claim_statement(dialect: Any) -> Any:
    """Insert the (app, kind) row, or move its time on if the last alert is old enough; a row
    comes back only when this caller may alert (one statement: exact under concurrency)."""
    stmt = dialect.insert(alert_state)
    return stmt.on_conflict_do_update(
        index_elements=["app_id", "kind"],
        set_={"last_at": stmt.excluded.last_at},
        where=alert_state.c.last_at <= bindparam("cutoff", type_=UTCDateTime),
    ).returning(alert_state.c.app_id)


_CLAIM_PG = _claim_statement(postgresql)


def _may_alert(conn: Connection, app_id: int, kind: str, now: datetime) -> bool:
    if conn.dialect.name == "sqlite":
        # SQLite compares the stored text: compute the cut-off here rather than in SQL.
        row = conn.execute(
            select(alert_state.c.last_at).where(
                alert_state.c.app_id == app_id, alert_state.c.kind == kind
            )
        ).first()
        if row is not None and row.last_at > now - ALERT_INTERVAL:
            return False  # the write lock is held: nobody moves it meanwhile
        conn.execute(
            sqlite.insert(alert_state)
            .values(app_id=app_id, kind=kind, last_at=now)
            .on_conflict_do_update(index_elements=["app_id", "kind"], set_={"last_at": now})
        )
        return True
    claimed = conn.execute(
        _CLAIM_PG.values(app_id=app_id, kind=kind, last_at=now), {"cutoff": now - ALERT_INTERVAL}
    )
    return claimed.first() is not None


def raise_alert_in(
    conn: Connection,
    app_id: int,
    kind: str,
    figures: Mapping[str, Any],
    *,
    held: bool = False,
    sender: str | None = None,
    now: datetime | None = None,
) -> int | None:
    """Record an `app.alert` in `conn`'s transaction (event, webhooks, the alert row, the
    e-mail to the organisation's owners and admins); returns the alert's id, or None when
    the app had an alert of this kind less than ALERT_INTERVAL ago (then nothing is written).
    `held`: the app's new mail is held because of it."""
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}")
    now = now or utcnow()
    if not _may_alert(conn, app_id, kind, now):
        return None
    app = conn.execute(
        select(apps.c.name, apps.c.organization_id, apps.c.hold_reason).where(apps.c.id == app_id)
    ).one()
    figures = dict(figures)
    alert_id = conn.execute(
        insert(app_alerts)
        .values(app_id=app_id, kind=kind, figures=figures, held=held, created_at=now)
        .returning(app_alerts.c.id)
    ).scalar_one()
    data = {
        "alert_id": alert_id,
        "kind": kind,
        "app": app.name,
        "figures": figures,
        "held": held,
        "hold_reason": app.hold_reason,
    }
    record(conn, Event(app_id=app_id, type=EventType.APP_ALERT, data=data, at=now))
    _mail_people(conn, app_id, app.organization_id, data, sender or _default_sender(), now)
    return int(alert_id)


def raise_alert(
    store: Store,
    app_id: int,
    kind: str,
    figures: Mapping[str, Any],
    *,
    held: bool = False,
    sender: str | None = None,
    now: datetime | None = None,
) -> int | None:
    """`raise_alert_in` in a transaction of its own."""
    with store.write() as conn:
        return raise_alert_in(conn, app_id, kind, figures, held=held, sender=sender, now=now)


def _default_sender() -> str:
    from postbode.config import get_settings

    settings = get_settings()
    return settings.alert_sender or f"postbode@{settings.smtp_hostname}"


def _recipients(conn: Connection, organization_id: int) -> list[str]:
    rows = conn.execute(
        select(users.c.email)
        .join(memberships, memberships.c.user_id == users.c.id)
        .where(
            memberships.c.organization_id == organization_id,
            memberships.c.role.in_(("owner", "admin")),
        )
        .order_by(users.c.email)
    )
    return list(rows.scalars())


def describe(data: Mapping[str, Any]) -> str:
    """An alert in one line of text, for the e-mail's subject, the banner and logs."""
    figures = ", ".join(f"{k} {v}" for k, v in dict(data.get("figures") or {}).items())
    held = "; new mail is held" if data.get("held") else ""
    return f"{data.get('app')}: {data.get('kind')} ({figures}){held}"


def _mail_people(
    conn: Connection,
    app_id: int,
    organization_id: int,
    data: Mapping[str, Any],
    sender: str,
    now: datetime,
) -> None:
    """Queue the alert e-mail as a message of the app (source `system`: not held by a hold)."""
    recipients = _recipients(conn, organization_id)
    if not recipients:
        return
    lines = [
        f"Postbode raised a {data['kind']} alert for the app {data['app']}.",
        "",
        *(f"  {k}: {v}" for k, v in dict(data["figures"]).items()),
        "",
    ]
    if data.get("held"):
        lines += [
            f"The app's new mail is held ({data.get('hold_reason') or 'no reason given'}).",
            f"Release it with `postbode app release {data['app']}` or on the app's page,",
            "or cancel the held mail from the queue page.",
        ]
    else:
        lines.append("Nothing was held.")
    lines += ["", f"At most one {data['kind']} alert per app and hour is sent."]
    queue_system_mail(
        conn,
        app_id=app_id,
        sender=sender,
        recipients=recipients,
        subject=f"Postbode alert: {describe(data)}",
        body="\n".join(lines),
        tag=ALERT_TAG,
        now=now,
        metadata={"alert_id": str(data["alert_id"])},
    )


def recent(
    conn: Connection, organization_id: int, *, app_id: int | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The organisation's latest alerts, newest first, with their app's name and hold."""
    query = (
        select(
            app_alerts.c.id,
            app_alerts.c.app_id,
            apps.c.name.label("app"),
            app_alerts.c.kind,
            app_alerts.c.figures,
            app_alerts.c.held,
            app_alerts.c.created_at,
            apps.c.hold_reason,
        )
        .join(apps, apps.c.id == app_alerts.c.app_id)
        .where(apps.c.organization_id == organization_id)
        .order_by(app_alerts.c.created_at.desc(), app_alerts.c.id.desc())
        .limit(limit)
    )
    if app_id is not None:
        query = query.where(app_alerts.c.app_id == app_id)
    return [dict(r) for r in conn.execute(query).mappings()]
