"""The dashboard: messages over time (Chart.js), rates, the queue now, top bounce reasons, top
tags and templates, for the organization or one app, and each app's sending health now (its
rate against its baseline, bounce and complaint rates against their thresholds); the live part
refreshes itself (htmx poll)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from postbode.abuse.figures import app_figures
from postbode.events.types import EventType
from postbode.stats import anomalies
from postbode.stats import queries as stats
from postbode.store.engine import Store
from postbode.store.schema import organizations, utcnow
from postbode.web.ui.core import (
    AppRef,
    SignedIn,
    UiError,
    UiRoute,
    Viewer,
    redirect,
    render,
    settings_of,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)
UTC_ZONE = ZoneInfo("UTC")

REFRESH_SECONDS = 10
NEAR = 0.8  # a figure at this share of its threshold or more is shown as near it
TEMPLATES_SHOWN = 20  # templates listed on the dashboard, most sent first
# The chart's lines: the stats' event names, shown as the delivery states people know.
CHART: tuple[tuple[str, str], ...] = (
    (str(EventType.MESSAGE_RECEIVED), "received"),
    (str(EventType.DELIVERY_DELIVERED), "delivered"),
    (str(EventType.DELIVERY_DEFERRED), "deferred"),
    (str(EventType.DELIVERY_BOUNCED), "bounced"),
    (str(EventType.MESSAGE_OPENED), "opened"),
    (str(EventType.MESSAGE_CLICKED), "clicked"),
)


def _label(at: datetime, size: timedelta, tz: ZoneInfo = UTC_ZONE) -> str:
    at = at.astimezone(tz)
    if size >= timedelta(days=1):
        return at.strftime("%b %d")
    if size >= timedelta(hours=1):
        return at.strftime("%b %d %H:00")
    return at.strftime("%H:%M")


def chart_data(series: stats.Series, tz: ZoneInfo = UTC_ZONE) -> dict[str, Any]:
    """What dashboard.js draws: labels and one line per CHART entry; each bucket's start and
    end (UTC), so that a click opens the message log of that bucket."""
    size = series.window.size
    return {
        "labels": [_label(b, series.window.size, tz) for b in series.buckets],
        "starts": [b.strftime("%Y-%m-%dT%H:%M") for b in series.buckets],
        "ends": [(b + size).strftime("%Y-%m-%dT%H:%M") for b in series.buckets],
        "bucket_seconds": int(series.window.size.total_seconds()),
        "lines": [
            {"key": name, "label": name, "data": series.counts.get(event, [])}
            for event, name in CHART
        ],
    }


def peaks_and_dips(
    store: Store, app_ids: list[int], series: stats.Series, log: Callable[..., str]
) -> list[dict[str, Any]]:
    """The peaks and dips raised in the chart's window, each with its bucket on the chart and
    the message log of that hour (and tag)."""
    window = series.window
    with store.read() as conn:
        found = anomalies.marks(conn, app_ids, window.since, window.until)
    buckets = {b: i for i, b in enumerate(series.buckets)}
    for mark in found:
        mark["index"] = buckets.get(stats.bucket_floor(mark["hour"], window.size))
        tag = mark["tag"] if not str(mark["tag"]).startswith("(") else ""
        params = {
            "since": mark["hour"].strftime("%Y-%m-%dT%H:%M"),
            "until": (mark["hour"] + anomalies.HOUR).strftime("%Y-%m-%dT%H:%M"),
        }
        mark["log_url"] = log(**params, tag=tag or None)
    return found


def cue(value: float | None, threshold: float | None, judged: bool = True) -> str:
    """How a figure stands against its threshold: `over`, `near` (at NEAR of it or more),
    `ok`, or `none` (no figure, or not judged at all). Over a threshold on too few deliveries
    for the detector to act is only `near`."""
    if value is None or not threshold:
        return "none"
    if value > threshold:
        return "over" if judged else "near"
    return "near" if value >= NEAR * threshold else "ok"


def health_of(app: AppRef, f: dict[str, Any]) -> dict[str, Any]:
    """One app's figures (abuse.figures.app_figures) with a cue for each, for the dashboard."""
    return {
        "app": app,
        "f": f,
        "rate": cue(f["per_minute"], f["spike_threshold_per_minute"]),
        "bounce": cue(
            f["bounce_rate"],
            f["bounce_threshold"],
            judged=f["deliveries"] >= f["bounce_min_deliveries"],
        ),
        "complaint": cue(
            f["complaint_rate"],
            f["complaint_threshold"],
            judged=f["delivered"] >= f["complaint_min_deliveries"],
        ),
    }


def sending_health(request: Request, viewer: Viewer | None) -> list[dict[str, Any]]:
    """Each app in view with its detectors' figures now and their cues."""
    if viewer is None:
        return []
    shown = [viewer.app] if viewer.app else list(viewer.apps)
    with store_of(request).read() as conn:
        figures = app_figures(conn, [a.id for a in shown], settings_of(request))
    return [health_of(a, figures[a.id]) for a in shown]


def template_rows(
    request: Request, viewer: Viewer | None, span: Span, app_ids: list[int]
) -> list[dict[str, Any]]:
    """The templates that sent in the dashboard's range, per app in view, most sent first:
    counted as the Templates page and GET /api/v1/stats?template= count them."""
    if viewer is None:
        return []
    named = {a.id: a for a in viewer.apps}
    found: list[dict[str, Any]] = []
    for app_id in app_ids:
        app = named.get(app_id)
        if app is None:
            continue
        for t in stats.template_stats(
            store_of(request),
            [app_id],
            None if span.since is not None else span.name,
            since=span.since,
            until=span.until,
        ):
            opened = t.totals.get(stats.OPENED, 0) - t.bots.get(stats.OPENED, 0)
            clicked = t.totals.get(stats.CLICKED, 0) - t.bots.get(stats.CLICKED, 0)
            found.append(
                {
                    "app": app.name,
                    "template": t.tag,
                    "sent": t.sent,
                    "delivered": t.totals.get(stats.DELIVERED, 0),
                    "bounced": t.totals.get(stats.BOUNCED, 0),
                    "opened": opened,
                    "clicked": clicked,
                    "rates": t.rates,
                }
            )
    found.sort(key=lambda r: (-r["sent"], r["app"], r["template"]))
    return found[:TEMPLATES_SHOWN]


@dataclass(frozen=True)
class Span:
    """The dashboard's time: a named range, "today" or a custom one, read in the
    organisation's time zone; `params` carry it in links and the live refresh."""

    name: str  # 1h | 24h | 7d | 30d | today | custom
    since: datetime | None  # UTC; None for a named range
    until: datetime | None
    tz: ZoneInfo
    params: dict[str, str]

    @property
    def label(self) -> str:
        zone = self.tz.key
        if self.name == "today":
            return f"today ({zone})"
        if self.name == "custom" and self.since is not None:
            start = self.since.astimezone(self.tz).strftime("%Y-%m-%d %H:%M")
            end = (self.until or utcnow()).astimezone(self.tz).strftime("%Y-%m-%d %H:%M")
            return f"{start} to {end} ({zone})"
        return f"last {self.name}"


def org_time_zone(store: Store, org_id: int) -> ZoneInfo:
    with store.read() as conn:
        name = conn.execute(
            select(organizations.c.time_zone).where(organizations.c.id == org_id)
        ).scalar()
    try:
        return ZoneInfo(str(name or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        return UTC_ZONE


def _local(value: str | None, tz: ZoneInfo, field: str) -> datetime | None:
    """A `datetime-local` value read in the organisation's time zone, as UTC."""
    if not value or not value.strip():
        return None
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UiError(400, f"{field}: not a time (YYYY-MM-DDTHH:MM)") from None
    return (at.replace(tzinfo=tz) if at.tzinfo is None else at).astimezone(UTC_ZONE)


def span_of(request: Request, tz: ZoneInfo, now: datetime | None = None) -> Span:
    params = request.query_params
    wanted = params.get("range", "24h")
    if wanted == "today":
        local_now = (now or utcnow()).astimezone(tz)
        midnight = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Span("today", midnight.astimezone(UTC_ZONE), None, tz, {"range": "today"})
    if wanted == "custom" or params.get("since"):
        since = _local(params.get("since"), tz, "since")
        until = _local(params.get("until"), tz, "until")
        if since is None:
            raise UiError(400, "since: give the start of the range")
        if until is not None and until <= since:
            raise UiError(400, "until: must be later than since")
        kept = {"range": "custom", "since": params.get("since", "")}
        if params.get("until"):
            kept["until"] = params.get("until", "")
        return Span("custom", since, until, tz, kept)
    name = wanted if wanted in stats.RANGES else "24h"
    return Span(name, None, None, tz, {"range": name})


def _context(request: Request, app_ids: list[int], span: Span) -> dict[str, Any]:
    try:
        board = stats.dashboard(
            store_of(request),
            app_ids,
            None if span.since is not None else span.name,
            since=span.since,
            until=span.until,
            types=[event for event, _ in CHART],
        )
    except stats.StatsError as exc:
        raise UiError(400, f"{exc.field}: {exc}") from None
    range_name = span.name
    viewer = getattr(request.state, "viewer", None)
    peaks = peaks_and_dips(
        store_of(request),
        app_ids,
        board.series,
        lambda **params: url("/messages", viewer, **params),
    )
    chart = chart_data(board.series, span.tz)
    chart["log_url"] = url("/messages", viewer)
    chart["marks"] = [
        {"index": p["index"], "kind": p["kind"], "tag": p["tag"]}
        for p in peaks
        if p["index"] is not None
    ]
    health = sending_health(request, viewer)
    totals, bots = board.summary.totals, board.summary.bots
    delivered = totals.get(stats.DELIVERED, 0)
    return {
        "board": board,
        "range": range_name,
        "ranges": [*stats.RANGES, "today"],
        "span": span,
        "chart": chart,
        "peaks": peaks,
        "bucket": board.series.window.size,
        "received": totals.get(str(EventType.MESSAGE_RECEIVED), 0),
        "delivered": delivered,
        "opens": {
            "human": board.summary.human.get(stats.OPENED, 0),
            "bot": bots.get(stats.OPENED, 0),
        },
        "clicks": {
            "human": board.summary.human.get(stats.CLICKED, 0),
            "bot": bots.get(stats.CLICKED, 0),
        },
        "refresh": REFRESH_SECONDS,
        "health": health,
        "near": NEAR,
    }


@router.get("/")
async def home(request: Request, viewer: SignedIn) -> Response:
    return redirect(request, url("/dashboard", viewer))


@router.get("/dashboard")
async def dashboard_page(request: Request, viewer: SignedIn) -> Response:
    tz = await run_in_threadpool(org_time_zone, store_of(request), viewer.org_id)
    span = span_of(request, tz)
    context = await run_in_threadpool(_context, request, viewer.app_ids, span)
    # Read from the counters' template dimension, as cheap as the tags' table.
    context["templates"] = await run_in_threadpool(
        template_rows, request, viewer, span, viewer.app_ids
    )
    context["templates_shown"] = TEMPLATES_SHOWN
    return render(request, "dashboard.html", context)


@router.get("/dashboard/live")
async def dashboard_live(request: Request, viewer: SignedIn) -> Response:
    """The part of the dashboard that refreshes itself: numbers, chart data, tables."""
    tz = await run_in_threadpool(org_time_zone, store_of(request), viewer.org_id)
    context = await run_in_threadpool(_context, request, viewer.app_ids, span_of(request, tz))
    return render(request, "_dashboard_live.html", context)


@router.get("/dashboard/templates")
async def dashboard_templates(request: Request, viewer: SignedIn) -> Response:
    """The templates' figures over the dashboard's range alone (the section the dashboard
    page shows), for a page or script that wants only them."""
    tz = await run_in_threadpool(org_time_zone, store_of(request), viewer.org_id)
    span = span_of(request, tz)
    try:
        rows = await run_in_threadpool(template_rows, request, viewer, span, viewer.app_ids)
    except stats.StatsError as exc:
        raise UiError(400, f"{exc.field}: {exc}") from None
    return render(
        request,
        "_dashboard_templates.html",
        {"templates": rows, "templates_shown": TEMPLATES_SHOWN, "span": span},
    )
