"""The dashboard: messages over time (Chart.js), rates, the queue now, top bounce reasons and
top tags, for the organization or one app; the live part refreshes itself (htmx poll)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from postbode.events.types import EventType
from postbode.stats import anomalies
from postbode.stats import queries as stats
from postbode.store.engine import Store
from postbode.web.ui.core import SignedIn, UiRoute, redirect, render, store_of, url

router = APIRouter(route_class=UiRoute, include_in_schema=False)

REFRESH_SECONDS = 10
# The chart's lines: the stats' event names, shown as the delivery states people know.
CHART: tuple[tuple[str, str], ...] = (
    (str(EventType.MESSAGE_RECEIVED), "received"),
    (str(EventType.DELIVERY_DELIVERED), "delivered"),
    (str(EventType.DELIVERY_DEFERRED), "deferred"),
    (str(EventType.DELIVERY_BOUNCED), "bounced"),
    (str(EventType.MESSAGE_OPENED), "opened"),
    (str(EventType.MESSAGE_CLICKED), "clicked"),
)


def _label(at: datetime, size: timedelta) -> str:
    if size >= timedelta(days=1):
        return at.strftime("%b %d")
    if size >= timedelta(hours=1):
        return at.strftime("%b %d %H:00")
    return at.strftime("%H:%M")


def chart_data(series: stats.Series) -> dict[str, Any]:
    """What dashboard.js draws: labels and one line per CHART entry; each bucket's start and
    end (UTC), so that a click opens the message log of that bucket."""
    size = series.window.size
    return {
        "labels": [_label(b, series.window.size) for b in series.buckets],
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


def _context(request: Request, app_ids: list[int], range_name: str) -> dict[str, Any]:
    board = stats.dashboard(
        store_of(request), app_ids, range_name, types=[event for event, _ in CHART]
    )
    viewer = getattr(request.state, "viewer", None)
    peaks = peaks_and_dips(
        store_of(request),
        app_ids,
        board.series,
        lambda **params: url("/messages", viewer, **params),
    )
    chart = chart_data(board.series)
    chart["log_url"] = url("/messages", viewer)
    chart["marks"] = [
        {"index": p["index"], "kind": p["kind"], "tag": p["tag"]}
        for p in peaks
        if p["index"] is not None
    ]
    totals, bots = board.summary.totals, board.summary.bots
    delivered = totals.get(stats.DELIVERED, 0)
    return {
        "board": board,
        "range": range_name,
        "ranges": list(stats.RANGES),
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
    }


def _range(request: Request) -> str:
    wanted = request.query_params.get("range", "24h")
    return wanted if wanted in stats.RANGES else "24h"


@router.get("/")
async def home(request: Request, viewer: SignedIn) -> Response:
    return redirect(request, url("/dashboard", viewer))


@router.get("/dashboard")
async def dashboard_page(request: Request, viewer: SignedIn) -> Response:
    range_name = _range(request)
    context = await run_in_threadpool(_context, request, viewer.app_ids, range_name)
    return render(request, "dashboard.html", context)


@router.get("/dashboard/live")
async def dashboard_live(request: Request, viewer: SignedIn) -> Response:
    """The part of the dashboard that refreshes itself: numbers, chart data, tables."""
    range_name = _range(request)
    context = await run_in_threadpool(_context, request, viewer.app_ids, range_name)
    return render(request, "_dashboard_live.html", context)
