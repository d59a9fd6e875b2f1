"""Weekly and monthly reports of an organisation or an app: volume, delivery, bounce, open and
click rates against the previous period, top bounce reasons and domains, alerts; as data, CSV
and an e-mail that Postbode sends through itself to the users who asked for it."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from postbode.events.types import EventType
from postbode.ingest.system_mail import queue_system_mail
from postbode.stats import queries
from postbode.store.engine import Store
from postbode.store.schema import (
    app_alerts,
    apps,
    deliveries,
    report_subscriptions,
    users,
    utcnow,
)

PERIODS = ("weekly", "monthly")
REPORT_TAG = "postbode-report"
TOP = 5


class ReportError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class Period:
    """A report's time: [since, until) in UTC, its key (2026-W49, 2026-11) and the period
    before it, to compare with."""

    kind: str
    since: datetime
    until: datetime
    key: str
    previous_since: datetime

    @property
    def title(self) -> str:
        if self.kind == "weekly":
            last = self.until - timedelta(days=1)
            return f"week {self.key} ({self.since:%d %b} to {last:%d %b %Y})"
        return f"{self.since:%B %Y}"


def last_complete(kind: str, now: datetime) -> Period:
    """The last whole week (Monday to Monday, UTC) or calendar month before `now`."""
    if kind not in PERIODS:
        raise ReportError("period", f"one of: {', '.join(PERIODS)}")
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "weekly":
        until = today - timedelta(days=today.weekday())
        since = until - timedelta(days=7)
        year, week, _ = since.isocalendar()
        return Period(kind, since, until, f"{year}-W{week:02d}", since - timedelta(days=7))
    until = today.replace(day=1)
    since = (until - timedelta(days=1)).replace(day=1)
    previous = (since - timedelta(days=1)).replace(day=1)
    return Period(kind, since, until, f"{since:%Y-%m}", previous)


@dataclass
class Figures:
    """One period's numbers."""

    received: int
    delivered: int
    bounced: int
    opened: int
    clicked: int
    rates: dict[str, float | None]


@dataclass
class Report:
    title: str
    scope: str  # the organisation's name, or "org / app"
    period: Period
    now: Figures
    previous: Figures
    bounce_reasons: list[tuple[str, int]] = field(default_factory=list)
    bounce_domains: list[tuple[str, int]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)


def _figures(store: Store, app_ids: Sequence[int], since: datetime, until: datetime) -> Figures:
    s = queries.summary(store, app_ids, since=since, until=until)
    human = s.human
    r = s.rates
    return Figures(
        received=s.totals.get(str(EventType.MESSAGE_RECEIVED), 0),
        delivered=s.totals.get(queries.DELIVERED, 0),
        bounced=s.totals.get(queries.BOUNCED, 0),
        opened=human.get(queries.OPENED, 0),
        clicked=human.get(queries.CLICKED, 0),
        rates={
            "delivery_rate": r.delivery_rate,
            "bounce_rate": r.bounce_rate,
            "open_rate": r.open_rate,
            "click_rate": r.click_rate,
        },
    )


def build(store: Store, app_ids: Sequence[int], scope: str, period: Period) -> Report:
    """The report of these apps over `period`, with the period before for comparison."""
    ids = list(app_ids)
    report = Report(
        title=f"Postbode {period.kind} report: {scope}, {period.title}",
        scope=scope,
        period=period,
        now=_figures(store, ids, period.since, period.until),
        previous=_figures(store, ids, period.previous_since, period.since),
    )
    reasons = queries.top_bounce_reasons(store, ids, since=period.since, until=period.until)
    report.bounce_reasons = [(r.category, r.count) for r in reasons[:TOP]]
    if not ids:
        return report
    with store.read() as conn:
        n = func.count().label("n")
        report.bounce_domains = [
            (str(row.recipient_domain), int(row.n))
            for row in conn.execute(
                select(deliveries.c.recipient_domain, n)
                .where(
                    deliveries.c.app_id.in_(ids),
                    deliveries.c.status == "bounced",
                    deliveries.c.last_attempt_at >= period.since,
                    deliveries.c.last_attempt_at < period.until,
                )
                .group_by(deliveries.c.recipient_domain)
                .order_by(n.desc(), deliveries.c.recipient_domain)
                .limit(TOP)
            )
        ]
        report.alerts = [
            {"at": row.created_at, "app": row.name, "kind": row.kind, "figures": row.figures}
            for row in conn.execute(
                select(
                    app_alerts.c.created_at, app_alerts.c.kind, app_alerts.c.figures, apps.c.name
                )
                .join(apps, apps.c.id == app_alerts.c.app_id)
                .where(
                    app_alerts.c.app_id.in_(ids),
                    app_alerts.c.created_at >= period.since,
                    app_alerts.c.created_at < period.until,
                )
                .order_by(app_alerts.c.created_at)
            )
        ]
    return report


# -- as CSV and as text (pure) -------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def _change(now: float | None, before: float | None) -> str:
    if now is None or before is None:
        return ""
    return f"{(now - before) * 100:+.1f} points"


METRICS = ("received", "delivered", "bounced", "opened", "clicked")
RATES = ("delivery_rate", "bounce_rate", "open_rate", "click_rate")


def csv_text(report: Report) -> str:
    """section, name, this period, previous period: one line per figure."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["section", "name", "value", "previous"])
    w.writerow(["period", report.period.kind, report.period.since.isoformat(), ""])
    w.writerow(["period", "until", report.period.until.isoformat(), ""])
    for name in METRICS:
        w.writerow(["volume", name, getattr(report.now, name), getattr(report.previous, name)])
    for name in RATES:
        now, before = report.now.rates[name], report.previous.rates[name]
        w.writerow(
            [
                "rate",
                name,
                "" if now is None else f"{now:.4f}",
                "" if before is None else f"{before:.4f}",
            ]
        )
    for category, count in report.bounce_reasons:
        w.writerow(["bounce_reason", category, count, ""])
    for domain, count in report.bounce_domains:
        w.writerow(["bounce_domain", domain, count, ""])
    for alert in report.alerts:
        w.writerow(["alert", alert["kind"], alert["app"], alert["at"].isoformat()])
    return out.getvalue()


def text(report: Report) -> str:
    """The e-mail's body."""
    n, p = report.now, report.previous
    lines = [report.title, "", f"{'':18}{'this period':>14}{'previous':>14}"]
    for name in METRICS:
        lines.append(f"{name:18}{getattr(n, name):>14,}{getattr(p, name):>14,}")
    lines.append("")
    for name in RATES:
        now, before = n.rates[name], p.rates[name]
        change = _change(now, before)
        label = name.replace("_", " ")
        lines.append(f"{label:18}{_pct(now):>14}{_pct(before):>14}  {change}")
    lines += ["", "Top bounce reasons:"]
    lines += [f"  {c}: {k:,}" for c, k in report.bounce_reasons] or ["  none"]
    lines += ["", "Top bounce domains:"]
    lines += [f"  {d}: {k:,}" for d, k in report.bounce_domains] or ["  none"]
    lines += ["", "Alerts:"]
    lines += [
        f"  {a['at']:%Y-%m-%d %H:%M} UTC  {a['app']}: {a['kind']}" for a in report.alerts
    ] or ["  none"]
    lines += ["", "Times are UTC. Rates count events by their time, as the dashboard does."]
    return "\n".join(lines) + "\n"


# -- subscriptions and the periodic e-mail ---------------------------------------------------------


def subscribe(
    store: Store, organization_id: int, user_id: int, period: str, app_id: int | None = None
) -> None:
    if period not in PERIODS:
        raise ReportError("period", f"one of: {', '.join(PERIODS)}")
    with store.write() as conn:
        found = conn.execute(
            select(report_subscriptions.c.id).where(
                report_subscriptions.c.organization_id == organization_id,
                report_subscriptions.c.user_id == user_id,
                report_subscriptions.c.period == period,
                report_subscriptions.c.app_id.is_(None)
                if app_id is None
                else report_subscriptions.c.app_id == app_id,
            )
        ).first()
        if found is None:
            conn.execute(
                insert(report_subscriptions).values(
                    organization_id=organization_id,
                    user_id=user_id,
                    app_id=app_id,
                    period=period,
                    created_at=utcnow(),
                )
            )


def _scope(conn: Connection, organization_id: int, app_id: int | None) -> tuple[list[int], str]:
    from postbode.store.schema import organizations

    org = conn.execute(
        select(organizations.c.name).where(organizations.c.id == organization_id)
    ).scalar_one()
    if app_id is not None:
        name = conn.execute(select(apps.c.name).where(apps.c.id == app_id)).scalar_one()
        return [app_id], f"{org} / {name}"
    ids = conn.execute(
        select(apps.c.id).where(apps.c.organization_id == organization_id).order_by(apps.c.id)
    ).scalars()
    return list(ids), str(org)


def send_due(store: Store, sender: str, *, now: datetime | None = None) -> int:
    """E-mail every subscription whose last complete period has not been sent yet; returns
    how many reports were queued. Each is marked sent in the transaction that queues it."""
    now = now or utcnow()
    with store.read() as conn:
        subs = conn.execute(
            select(report_subscriptions, users.c.email).join(
                users, users.c.id == report_subscriptions.c.user_id
            )
        ).all()
    sent = 0
    for sub in subs:
        period = last_complete(sub.period, now)
        if sub.last_sent == period.key:
            continue
        with store.read() as conn:
            app_ids, scope = _scope(conn, sub.organization_id, sub.app_id)
        if not app_ids:
            continue
        report = build(store, app_ids, scope, period)
        with store.write() as conn:
            claimed = conn.execute(
                update(report_subscriptions)
                .where(
                    report_subscriptions.c.id == sub.id,
                    (report_subscriptions.c.last_sent.is_(None))
                    | (report_subscriptions.c.last_sent != period.key),
                )
                .values(last_sent=period.key)
            ).rowcount
            if not claimed:
                continue  # another node sent it meanwhile
            # Queued for now, whatever `now` the period was judged at.
            queue_mail(conn, app_ids[0], sender, [sub.email], report.title, text(report), utcnow())
        sent += 1
    return sent


def queue_mail(
    conn: Connection,
    app_id: int,
    sender: str,
    recipients: list[str],
    subject: str,
    body: str,
    now: datetime,
) -> None:
    """The report as a message Postbode writes itself, queued for delivery like any other (in
    `conn`'s transaction)."""
    queue_system_mail(
        conn,
        app_id=app_id,
        sender=sender,
        recipients=recipients,
        subject=subject,
        body=body,
        tag=REPORT_TAG,
        now=now,
    )
