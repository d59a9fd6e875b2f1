"""The statistics API: GET /api/v1/stats (series and summary) and /api/v1/stats/compare."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from postbode.stats import queries, reports
from postbode.stats.queries import StatsError
from postbode.store.engine import Store
from postbode.store.schema import apps, utcnow
from postbode.web.api.fields import Instant
from postbode.web.auth import ApiApp, AuthenticatedRoute
from postbode.web.errors import ApiError

router = APIRouter(prefix="/api/v1", tags=["stats"], route_class=AuthenticatedRoute)

Stream = Literal["transactional", "broadcast"]


class RatesOut(BaseModel):
    delivery_rate: float | None = Field(description="delivered / (delivered + bounced + failed)")
    bounce_rate: float | None = Field(description="bounced / (delivered + bounced + failed)")
    open_rate: float | None = Field(
        description="opens by people (not bots) / delivered, capped at 1; every open counts"
    )
    click_rate: float | None = Field(description="clicks by people / delivered, capped at 1")
    complaint_rate: float | None = Field(description="complaints / delivered")


class SeriesOut(BaseModel):
    since: datetime
    until: datetime
    bucket_seconds: int
    buckets: list[datetime] = Field(description="The start of each bucket, oldest first")
    counts: dict[str, list[int]] = Field(description="Per event type, one count per bucket")
    bots: dict[str, list[int]] = Field(description="The part of `counts` made by bots")


class SummaryOut(BaseModel):
    since: datetime
    until: datetime
    sent: int = Field(description="Recipients taken in: delivery.queued + delivery.suppressed")
    totals: dict[str, int] = Field(description="Events per type, people and bots")
    human: dict[str, int]
    bots: dict[str, int]
    rates: RatesOut


class StatsOut(BaseModel):
    series: SeriesOut
    summary: SummaryOut


class TagOut(BaseModel):
    tag: str
    sent: int
    totals: dict[str, int]
    bots: dict[str, int]
    rates: RatesOut


class TestOut(BaseModel):
    metric: str
    a_rate: float | None
    b_rate: float | None
    z: float | None
    p_value: float | None
    significant: bool = Field(description="Two-proportion z-test, p < 0.05")
    note: str


class CompareOut(BaseModel):
    a: TagOut
    b: TagOut
    tests: list[TestOut]


RangeParam = Annotated[
    queries.RangeName | None,
    Query(alias="range", description="A named range ending now; default 24h"),
]
SinceParam = Annotated[
    Instant | None, Query(description="Instead of range: from (ISO 8601; UTC if no zone)")
]
UntilParam = Annotated[Instant | None, Query(description="With since: until (default now)")]


def _types(values: list[str] | None) -> list[str] | None:
    """Repeated (`types=a&types=b`) or comma-separated (`types=a,b`) event types."""
    if not values:
        return None
    return [t.strip() for v in values for t in v.split(",") if t.strip()] or None


def _answer(error: StatsError) -> ApiError:
    return ApiError(422, "invalid", str(error), error.field)


@router.get("/stats", response_model=StatsOut, summary="Counts per bucket and totals with rates")
def get_stats(
    request: Request,
    app_id: ApiApp,
    range_: RangeParam = None,
    since: SinceParam = None,
    until: UntilParam = None,
    tag: Annotated[str | None, Query(max_length=100, description="Only this tag")] = None,
    stream: Annotated[Stream | None, Query()] = None,
    template: Annotated[
        str | None,
        Query(max_length=100, description="Only mail made from this template (its alias)"),
    ] = None,
    types: Annotated[
        list[str] | None,
        Query(
            description="Event types in the series (default: the delivery outcomes and "
            "opens, clicks, complaints, unsubscribes)"
        ),
    ] = None,
) -> dict[str, Any]:
    """The caller's event counts per bucket (zero-filled; 1h by the minute, 24h by the
    quarter hour, 7d by the hour, 30d by the day, UTC) and the window's totals and rates."""
    store: Store = request.app.state.store
    if range_ is None and since is None and until is not None:
        raise ApiError(422, "invalid", "give since with until", "since")
    try:
        series, summary = queries.series_and_summary(
            store,
            [app_id],
            range_ if range_ is not None or since is not None else "24h",
            since=since,
            until=until,
            types=_types(types),
            tag=tag or None,
            stream=stream,
            template=template or None,
        )
    except StatsError as exc:
        raise _answer(exc) from None
    return {"series": series.as_json(), "summary": summary.as_json()}


@router.get("/stats/compare", response_model=CompareOut, summary="Compare two tags (an A/B test)")
def compare_tags(
    request: Request,
    app_id: ApiApp,
    a: Annotated[str, Query(min_length=1, max_length=100, description="Tag A")],
    b: Annotated[str, Query(min_length=1, max_length=100, description="Tag B")],
    range_: RangeParam = None,
    since: SinceParam = None,
    until: UntilParam = None,
    stream: Annotated[Stream | None, Query()] = None,
) -> dict[str, Any]:
    """Two tags side by side over a window, with a two-proportion z-test per rate saying
    whether the difference is likely more than chance."""
    store: Store = request.app.state.store
    try:
        result = queries.compare(
            store,
            [app_id],
            a,
            b,
            range_ if range_ is not None or since is not None else "24h",
            since=since,
            until=until,
            stream=stream,
        )
    except StatsError as exc:
        raise _answer(exc) from None
    return result.as_json()


@router.get(
    "/stats/export",
    summary="The weekly or monthly report as CSV",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
def export_stats(
    request: Request,
    app_id: ApiApp,
    format: Annotated[Literal["csv"], Query(description="Only `csv` for now")] = "csv",
    period: Annotated[
        Literal["weekly", "monthly"],
        Query(
            description="The last complete week (midnight Monday to midnight Monday) or "
            "calendar month, in the organisation's time zone"
        ),
    ] = "weekly",
) -> Response:
    """The caller's report of the last complete period: volume, delivery, bounce, open and
    click rates with the previous period's, top bounce reasons and domains, alerts. Rows:
    `section, name, value, previous`."""
    store: Store = request.app.state.store
    with store.read() as conn:
        app = conn.execute(
            select(apps.c.name, apps.c.organization_id).where(apps.c.id == app_id)
        ).one()
        zone = reports.organization_zone(conn, app.organization_id)
    name = str(app.name)
    report = reports.build(store, [app_id], name, reports.last_complete(period, utcnow(), zone))
    filename = f"postbode-{name}-{report.period.key}.csv"
    return Response(
        reports.csv_text(report),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
