"""Weekly and monthly reports of an organisation or an app, in the organisation's time zone:
volume, delivery, bounce, open and click rates against the previous period, top bounce reasons
and domains, alerts; as data, CSV and a text-and-HTML e-mail that Postbode sends through itself
to the users who asked for it."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import Connection, func, insert, select, update

from postbode.events.types import EventType
from postbode.ingest.system_mail import queue_system_mail
from postbode.stats import queries
from postbode.store.engine import Store
from postbode.store.schema import (
    app_alerts,
    apps,
    deliveries,
    events,
    organizations,
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


UTC_ZONE = ZoneInfo("UTC")


def organization_zone(conn: Connection, organization_id: int) -> ZoneInfo:
    """The organisation's time zone (IANA name; UTC when unset or unknown to this system)."""
    name = conn.execute(
        select(organizations.c.time_zone).where(organizations.c.id == organization_id)
    ).scalar()
    try:
        return ZoneInfo(str(name or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        return UTC_ZONE


@dataclass(frozen=True)
class Period:
    """A report's time: [since, until) as UTC instants that are local midnights in `tz`, its
    key (2026-W49, 2026-11, by local dates) and the period before it, to compare with."""

    kind: str
    since: datetime
    until: datetime
    key: str
    previous_since: datetime
    tz: ZoneInfo = UTC_ZONE

    @property
    def zone(self) -> str:
        return self.tz.key

    def local(self, at: datetime) -> datetime:
        """An instant as the organisation's clocks showed it."""
        return at.astimezone(self.tz)

    @property
    def title(self) -> str:
        if self.kind == "weekly":
            first = self.local(self.since)
            last = self.local(self.until) - timedelta(days=1)
            return f"week {self.key} ({first:%d %b} to {last:%d %b %Y})"
        return f"{self.local(self.since):%B %Y}"


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of `day` in `tz`, in UTC. Where a DST change skips midnight
    (fold=0 reads the skipped time with the offset before the change) that is the day's
    first instant all the same."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


def last_complete(kind: str, now: datetime, tz: ZoneInfo = UTC_ZONE) -> Period:
    """The last whole week (local midnight Monday to local midnight Monday) or calendar
    month (local midnight on the 1st to the next) before `now`, in the time zone `tz`."""
    if kind not in PERIODS:
        raise ReportError("period", f"one of: {', '.join(PERIODS)}")
    today = now.astimezone(tz).date()
    if kind == "weekly":
        until = today - timedelta(days=today.weekday())
        since = until - timedelta(days=7)
        previous = since - timedelta(days=7)
        year, week, _ = since.isocalendar()
        key = f"{year}-W{week:02d}"
    else:
        until = today.replace(day=1)
        since = (until - timedelta(days=1)).replace(day=1)
        previous = (since - timedelta(days=1)).replace(day=1)
        key = f"{since:%Y-%m}"
    return Period(
        kind, _midnight(since, tz), _midnight(until, tz), key, _midnight(previous, tz), tz
    )


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


DAY = timedelta(days=1)
COUNTED = (
    str(EventType.MESSAGE_RECEIVED),
    queries.DELIVERED,
    queries.BOUNCED,
    queries.FAILED,
    queries.OPENED,
    queries.CLICKED,
)


def _utc_day(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def _event_counts(
    store: Store, app_ids: Sequence[int], since: datetime, until: datetime
) -> tuple[dict[str, int], dict[str, int]]:
    """(totals, bots) per event type from the event rows of [since, until), counted as the
    counters count them: a repeated click is kept as a record but not counted."""
    bot = func.coalesce(events.c.data["bot"].as_boolean(), False)
    repeat = func.coalesce(events.c.data["repeat"].as_boolean(), False)
    with store.read() as conn:
        rows = conn.execute(
            select(events.c.type, bot.label("bot"), func.count().label("n"))
            .where(
                events.c.app_id.in_(list(app_ids)),
                events.c.type.in_(COUNTED),
                events.c.created_at >= since,
                events.c.created_at < until,
                repeat.is_(False),
            )
            .group_by(events.c.type, "bot")
        ).all()
    totals: dict[str, int] = {}
    bots: dict[str, int] = {}
    for row in rows:
        _add(totals, {str(row.type): int(row.n)})
        if row.bot:
            _add(bots, {str(row.type): int(row.n)})
    return totals, bots


def _slice(
    store: Store, app_ids: Sequence[int], begin: datetime, end: datetime
) -> tuple[dict[str, int], dict[str, int]]:
    """The counts of [begin, end), less than a UTC day: from the event rows while they hold
    that whole day (its events add up to its counters), else (retention deleted them) from
    the counter rows, each counted where its bucket starts."""
    day = _utc_day(begin)
    kept, _ = _event_counts(store, app_ids, day, day + DAY)
    counted = queries.summary(store, app_ids, since=day, until=day + DAY).totals
    if all(kept.get(t, 0) == counted.get(t, 0) for t in COUNTED):
        return _event_counts(store, app_ids, begin, end)
    s = queries.summary(store, app_ids, since=begin, until=end)
    return dict(s.totals), dict(s.bots)


def _figures(store: Store, app_ids: Sequence[int], since: datetime, until: datetime) -> Figures:
    """One period's numbers. Counter rows older than a few days are merged into UTC days
    (stats/rollup.py), which a local midnight cuts through: the whole UTC days inside the
    period are read from the counters, the slices before and after them from the event rows
    (a day at most each), so a period starts and ends at its exact instants."""
    totals: dict[str, int] = {}
    bots: dict[str, int] = {}
    inner_since = _utc_day(since) + (DAY if _utc_day(since) != since else timedelta(0))
    inner_until = _utc_day(until)
    if inner_since < inner_until:
        s = queries.summary(store, app_ids, since=inner_since, until=inner_until)
        _add(totals, s.totals)
        _add(bots, s.bots)
        slices = [(since, inner_since), (inner_until, until)]
    else:
        slices = [(since, until)]
    for begin, end in slices:
        if begin < end:
            more_totals, more_bots = _slice(store, app_ids, begin, end)
            _add(totals, more_totals)
            _add(bots, more_bots)
    r = queries.rates(totals, bots)
    return Figures(
        received=totals.get(str(EventType.MESSAGE_RECEIVED), 0),
        delivered=totals.get(queries.DELIVERED, 0),
        bounced=totals.get(queries.BOUNCED, 0),
        opened=totals.get(queries.OPENED, 0) - bots.get(queries.OPENED, 0),
        clicked=totals.get(queries.CLICKED, 0) - bots.get(queries.CLICKED, 0),
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
    """section, name, this period, previous period: one line per figure; times are local
    to the organisation's zone (ISO 8601 with the offset), named on the `time_zone` line."""
    period = report.period
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(["section", "name", "value", "previous"])
    w.writerow(["period", period.kind, period.local(period.since).isoformat(), ""])
    w.writerow(["period", "until", period.local(period.until).isoformat(), ""])
    w.writerow(["period", "time_zone", period.zone, ""])
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
        w.writerow(["alert", alert["kind"], alert["app"], period.local(alert["at"]).isoformat()])
    return out.getvalue()


def text(report: Report) -> str:
    """The e-mail's text part."""
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
    zone = report.period.zone
    lines += [
        f"  {report.period.local(a['at']):%Y-%m-%d %H:%M}  {a['app']}: {a['kind']}"
        for a in report.alerts
    ] or ["  none"]
    lines += [
        "",
        f"Times are {zone}. Rates count events by their time, as the dashboard does.",
    ]
    return "\n".join(lines) + "\n"


TEMPLATES = Path(__file__).parent / "templates"


@cache
def _mail_templates() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def html(report: Report) -> str:
    """The e-mail's HTML part: tables with inline styles (what mail clients render alike),
    no scripts, no images, nothing fetched from elsewhere."""
    period = report.period
    rates = [
        (
            name.replace("_", " "),
            _pct(report.now.rates[name]),
            _pct(report.previous.rates[name]),
            _change(report.now.rates[name], report.previous.rates[name]),
        )
        for name in RATES
    ]
    alerts = [
        (f"{period.local(a['at']):%Y-%m-%d %H:%M}", str(a["app"]), str(a["kind"]))
        for a in report.alerts
    ]
    page = (
        _mail_templates()
        .get_template("report_mail.html")
        .render(
            report=report,
            volume=[
                (name, f"{getattr(report.now, name):,}", f"{getattr(report.previous, name):,}")
                for name in METRICS
            ],
            rates=rates,
            reasons=[(c.replace("_", " "), f"{k:,}") for c, k in report.bounce_reasons],
            domains=[(d, f"{k:,}") for d, k in report.bounce_domains],
            alerts=alerts,
            zone=period.zone,
        )
    )
    # Clients drop <style> blocks (Gmail's app, Outlook): every rule goes onto its elements.
    inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_style_tags=False)
    return str(inliner.inline(page))


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
        with store.read() as conn:
            zone = organization_zone(conn, sub.organization_id)
        period = last_complete(sub.period, now, zone)
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
            queue_mail(conn, app_ids[0], sender, [sub.email], report, utcnow())
        sent += 1
    return sent


def queue_mail(
    conn: Connection,
    app_id: int,
    sender: str,
    recipients: list[str],
    report: Report,
    now: datetime,
) -> None:
    """The report as a message Postbode writes itself (text and HTML alternatives), queued for
    delivery like any other (in `conn`'s transaction)."""
    queue_system_mail(
        conn,
        app_id=app_id,
        sender=sender,
        recipients=recipients,
        subject=report.title,
        body=text(report),
        html=html(report),
        tag=REPORT_TAG,
        now=now,
    )
