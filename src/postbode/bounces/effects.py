"""What a bounce or complaint does to the store: delivery state, its event, and suppressions."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, func, select, update

from postbode.bounces.classify import CATEGORIES, Classification
from postbode.bounces.parse import BounceRecord, BounceReport
from postbode.bounces.suppression import suppress
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.schema import deliveries, events, messages

log = logging.getLogger(__name__)

# Deliveries we never handed to anyone: no report about them can be true.
NEVER_SENT = frozenset({"suppressed", "cancelled"})
# States a delay report ("still trying") cannot add anything to.
FINAL = frozenset({"bounced", "failed", "suppressed", "cancelled"})
# Refusals because of the sender (its IP, domain or content) never cost a recipient their mail.
NEVER_COUNTED = frozenset({"blocked", "auth_failure", "rate_limited", "content_rejected"})
# RFC 5965 §7.3 feedback types that are no complaint about a recipient: RFC 6591
# authentication failure reports, and "not spam" reports.
NOT_COMPLAINTS = frozenset({"auth-failure", "not-spam"})
OPT_OUTS = frozenset({"opt-out", "unsubscribe"})
# Report text is whatever a remote wrote: PostgreSQL text holds no NUL, and no control
# character belongs in a diagnostic shown in the UI or sent in a webhook.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")
MAX_TEXT = 2000


def clean_text(value: str | None, limit: int = MAX_TEXT) -> str:
    """Text from a report, safe to store: control characters out, length bounded."""
    return _CONTROL_RE.sub(" ", value or "")[:limit].strip()


@dataclass(frozen=True, slots=True)
class SoftBouncePolicy:
    """When soft bounces of one address add up to a (temporary) suppression."""

    categories: frozenset[str]
    count: int
    window: timedelta
    duration: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> SoftBouncePolicy:
        names = frozenset(
            c.strip() for c in settings.soft_bounce_categories.split(",") if c.strip()
        )
        unknown = names - set(CATEGORIES)
        if unknown:
            raise ValueError(f"soft_bounce_categories: unknown categories {sorted(unknown)}")
        if names & NEVER_COUNTED:
            raise ValueError(
                "soft_bounce_categories: refusals because of the sender never suppress a "
                f"recipient: remove {sorted(names & NEVER_COUNTED)}"
            )
        return cls(
            categories=names,
            count=settings.soft_bounce_suppress_count,
            window=timedelta(hours=settings.soft_bounce_window_hours),
            duration=timedelta(days=settings.soft_bounce_suppress_days),
        )


@dataclass(frozen=True, slots=True)
class Target:
    """A delivery a report is about, with what its events need from its message."""

    id: uuid.UUID
    app_id: int
    message_id: uuid.UUID
    recipient: str
    status: str
    attempts: int
    stream: str
    tag: str | None
    template: str | None

    @classmethod
    def from_row(cls, row: RowMapping | Mapping[str, Any]) -> Target:
        return cls(
            id=row["id"],
            app_id=row["app_id"],
            message_id=row["message_id"],
            recipient=row["recipient"],
            status=row["status"],
            attempts=row["attempts"],
            stream=row["stream"],
            tag=row["tag"],
            template=row["template"],
        )


TARGET_COLUMNS = (
    deliveries.c.id,
    deliveries.c.app_id,
    deliveries.c.message_id,
    deliveries.c.recipient,
    deliveries.c.status,
    deliveries.c.attempts,
    messages.c.stream,
    messages.c.tag,
    messages.c.template,
)


def target_query() -> Any:
    """SELECT of Target columns (add a WHERE); rows locked for the caller's transaction."""
    return (
        select(*TARGET_COLUMNS)
        .join(messages, messages.c.id == deliveries.c.message_id)
        .with_for_update(of=deliveries)
    )


def load_target(conn: Connection, delivery_id: uuid.UUID) -> Target | None:
    row = conn.execute(target_query().where(deliveries.c.id == delivery_id)).mappings().first()
    return Target.from_row(row) if row is not None else None


# -- suppression after a bounce: the one path for SMTP replies and DSNs -----------------------


def suppress_after_bounce(
    conn: Connection,
    *,
    app_id: int,
    recipient: str,
    message_id: uuid.UUID | None,
    category: str,
    hard: bool,
    detail: str,
    policy: SoftBouncePolicy,
    now: datetime,
) -> str | None:
    """Suppress after a bounce already recorded on its delivery (in the same transaction):
    a hard one (the address is bad) for good; a soft one of the policy's categories when the
    address has bounced so `policy.count` times within `policy.window`, for `policy.duration`.
    A refusal because of the sender (a reputation block above all) never suppresses.
    Returns "hard", "soft_repeated" or None."""
    detail = clean_text(detail)
    if hard:
        suppress(
            conn,
            app_id,
            recipient,
            reason=category,
            source="bounce",
            message_id=message_id,
            detail=detail,
        )
        return "hard"
    if category not in policy.categories or category in NEVER_COUNTED or policy.count < 1:
        return None
    # Every delivery of this app to this address that ended as such a soft bounce lately,
    # whether the reply came during the SMTP session or later in a DSN: both end in
    # deliveries.status = bounced, so one count serves both.
    forms = {recipient, recipient.lower()}
    recent = conn.execute(
        select(func.count())
        .select_from(deliveries)
        .where(
            deliveries.c.app_id == app_id,
            deliveries.c.recipient.in_(forms),
            deliveries.c.status == "bounced",
            deliveries.c.hard.is_(False),
            deliveries.c.bounce_category.in_(policy.categories),
            deliveries.c.updated_at >= now - policy.window,
        )
    ).scalar_one()
    if recent < policy.count:
        return None
    suppress(
        conn,
        app_id,
        recipient,
        reason=category,
        source="bounce",
        message_id=message_id,
        detail=f"{recent} soft bounces within {_hours(policy.window)} h: {detail}",
        expires_at=now + policy.duration,
    )
    return "soft_repeated"


def after_smtp_bounce(
    conn: Connection,
    delivery: Any,
    found: Classification,
    detail: str,
    settings: Settings,
    now: datetime,
) -> str | None:
    """For the delivery worker: a refusal during the SMTP session was recorded as `bounced`
    on `delivery` (a deliveries row); suppress as a DSN for the same failure would."""
    return suppress_after_bounce(
        conn,
        app_id=delivery.app_id,
        recipient=delivery.recipient,
        message_id=delivery.message_id,
        category=found.category,
        hard=found.hard,
        detail=detail,
        policy=SoftBouncePolicy.from_settings(settings),
        now=now,
    )


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g}"


# -- DSNs (RFC 3464) ------------------------------------------------------------------------


def apply_dsn(
    conn: Connection,
    target: Target,
    rec: BounceRecord,
    policy: SoftBouncePolicy,
    now: datetime,
) -> str:
    """Apply one DSN record about `target` (locked by the caller). Returns what happened:
    "bounced", "deferred" (a delay noted), "duplicate" or "ignored"."""
    common = _common(target)
    diagnostic = clean_text(rec.diagnostic)
    status = clean_text(rec.status, 16) or None
    category = clean_text(rec.category, 32) or "unknown"
    if rec.action == "delayed":
        # RFC 3464 §2.3.3: "delayed" — the reporting MTA is still trying. It changes no
        # state; while the delivery is not final, the app hears of the delay.
        if target.status in FINAL:
            return "ignored"
        record(
            conn,
            Event(
                type=EventType.DELIVERY_DEFERRED,
                at=now,
                data={
                    "source": "dsn",
                    "status": status,
                    "category": category,
                    "diagnostic": diagnostic,
                },
                **common,
            ),
        )
        return "deferred"
    if target.status == "bounced":
        return "duplicate"  # the SMTP reply or an earlier copy of this DSN said it already
    if target.status in NEVER_SENT or target.attempts == 0:
        return "ignored"
    # A delivery the remote accepted (delivered) and then bounced is the asynchronous bounce
    # this exists for; any other state the DSN overrides: the remote had the message.
    conn.execute(
        update(deliveries)
        .where(deliveries.c.id == target.id)
        .values(
            status="bounced",
            bounce_category=category,
            bounce_status=status,
            hard=rec.hard,
            last_reply=diagnostic or None,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )
    )
    record(
        conn,
        Event(
            type=EventType.DELIVERY_BOUNCED,
            at=now,
            data={
                "hard": rec.hard,
                "category": category,
                "status": status,
                "diagnostic": diagnostic,
                "source": "dsn",
            },
            **common,
        ),
    )
    suppress_after_bounce(
        conn,
        app_id=target.app_id,
        recipient=target.recipient,
        message_id=target.message_id,
        category=category,
        hard=rec.hard,
        detail=diagnostic,
        policy=policy,
        now=now,
    )
    return "bounced"


# -- complaints (RFC 5965 ARF) --------------------------------------------------------------


def apply_complaint(conn: Connection, target: Target, report: BounceReport, now: datetime) -> str:
    """A recipient marked the message as spam (or opted out): the event, and the address
    suppressed for good on the message's stream. Returns "complained", "unsubscribed",
    "duplicate" or "ignored"."""
    feedback = clean_text(report.feedback_type, 64).lower() or "abuse"
    if feedback in NOT_COMPLAINTS:
        return "ignored"
    opt_out = feedback in OPT_OUTS
    kind = EventType.MESSAGE_UNSUBSCRIBED if opt_out else EventType.MESSAGE_COMPLAINED
    seen = conn.execute(
        select(events.c.id).where(events.c.delivery_id == target.id, events.c.type == str(kind))
    ).first()
    if seen is not None:
        return "duplicate"  # feedback loops resend; one complaint is one event
    data: dict[str, Any] = {"feedback_type": feedback, "source": "arf"}
    if report.reporting_mta:
        data["reporting_mta"] = clean_text(report.reporting_mta, 255)
    record(conn, Event(type=kind, at=now, data=data, **_common(target)))
    suppress(
        conn,
        target.app_id,
        target.recipient,
        reason="unsubscribed" if opt_out else "complaint",
        source="unsubscribe" if opt_out else "complaint",
        stream=target.stream,
        message_id=target.message_id,
        detail=f"feedback-type: {feedback}",
    )
    return "unsubscribed" if opt_out else "complained"


def _common(target: Target) -> dict[str, Any]:
    return {
        "app_id": target.app_id,
        "stream": target.stream,
        "tag": target.tag,
        "template": target.template,
        "message_id": target.message_id,
        "delivery_id": target.id,
        "recipient": target.recipient,
    }
