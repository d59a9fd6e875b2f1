"""The reports page: the last complete week or month of the organisation (or the app in view)
against the one before, as a page and CSV; a user asks for it by e-mail here."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from postbode.stats import reports
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.web.ui.core import (
    SignedIn,
    UiError,
    UiRoute,
    Viewer,
    redirect,
    render,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)


def _period(request: Request) -> str:
    wanted = request.query_params.get("period", "weekly")
    if wanted not in reports.PERIODS:
        raise UiError(400, f"period: one of {', '.join(reports.PERIODS)}")
    return wanted


def _build(store: Store, viewer: Viewer, period: str) -> reports.Report:
    """The last complete period of the organisation (or the app in view), in its time zone."""
    scope = f"{viewer.org_name} / {viewer.app.name}" if viewer.app else viewer.org_name
    with store.read() as conn:
        zone = reports.organization_zone(conn, viewer.org_id)
    period_ = reports.last_complete(period, utcnow(), zone)
    return reports.build(store, viewer.app_ids, scope, period_)


@router.get("/reports")
async def report_page(request: Request, viewer: SignedIn) -> Response:
    period = _period(request)
    report = await run_in_threadpool(_build, store_of(request), viewer, period)
    return render(
        request,
        "reports.html",
        {
            "report": report,
            "period": period,
            "periods": reports.PERIODS,
            "metrics": reports.METRICS,
            "rates": reports.RATES,
            "csv_url": url("/reports/export.csv", viewer, period=period),
        },
    )


@router.get("/reports/export.csv")
async def report_csv(request: Request, viewer: SignedIn) -> Response:
    period = _period(request)
    report = await run_in_threadpool(_build, store_of(request), viewer, period)
    return Response(
        reports.csv_text(report),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="postbode-{report.period.key}.csv"'},
    )


@router.post("/reports/subscribe")
async def subscribe(request: Request, viewer: SignedIn) -> Response:
    """E-mail me this report every period (the organisation's, or the app's in view)."""
    period = _period(request)
    await run_in_threadpool(
        reports.subscribe,
        store_of(request),
        viewer.org_id,
        viewer.user_id,
        period,
        viewer.app.id if viewer.app else None,
    )
    return redirect(
        request,
        url("/reports", viewer, period=period),
        f"You will get this {period} report by e-mail at the start of each "
        f"{'week' if period == 'weekly' else 'month'}.",
    )
