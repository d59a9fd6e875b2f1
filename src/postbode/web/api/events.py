"""The events API: GET /api/v1/events, the caller's events filtered and paged by event id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import events
from postbode.web.api.fields import Instant
from postbode.web.auth import ApiApp, AuthenticatedRoute

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

router = APIRouter(prefix="/api/v1", tags=["events"], route_class=AuthenticatedRoute)


class EventOut(BaseModel):
    id: UUID
    type: str
    created_at: datetime
    message_id: UUID | None
    delivery_id: UUID | None
    recipient: str | None
    data: dict[str, Any]


class EventList(BaseModel):
    data: list[EventOut]
    next_cursor: UUID | None = Field(description="Pass as `cursor` for the next page")


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def query_events(
    store: Store,
    app_id: int,
    *,
    types: list[str] | None = None,
    message_id: UUID | None = None,
    recipient: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: UUID | None = None,
    limit: int = PAGE_SIZE,
    order: str = "desc",
) -> tuple[list[dict[str, Any]], UUID | None]:
    """One page of the app's events and the cursor of the next (keyset on the time-ordered
    event id, so pages neither skip nor repeat events when new ones arrive)."""
    query = select(
        events.c.id,
        events.c.type,
        events.c.created_at,
        events.c.message_id,
        events.c.delivery_id,
        events.c.recipient,
        events.c.data,
    ).where(events.c.app_id == app_id)
    if types:
        query = query.where(events.c.type.in_(types))
    if message_id is not None:
        query = query.where(events.c.message_id == message_id)
    if recipient is not None:
        query = query.where(func.lower(events.c.recipient) == recipient.strip().lower())
    if (start := _utc(since)) is not None:
        query = query.where(events.c.created_at >= start)
    if (end := _utc(until)) is not None:
        query = query.where(events.c.created_at < end)
    if order == "asc":
        if cursor is not None:
            query = query.where(events.c.id > cursor)
        query = query.order_by(events.c.id.asc())
    else:
        if cursor is not None:
            query = query.where(events.c.id < cursor)
        query = query.order_by(events.c.id.desc())
    with store.read() as conn:
        rows = conn.execute(query.limit(limit + 1)).all()
    page = [dict(r._mapping) for r in rows[:limit]]
    return page, page[-1]["id"] if len(rows) > limit else None


@router.get("/events", response_model=EventList, summary="List events, newest first")
async def list_events(
    request: Request,
    app_id: ApiApp,
    type: Annotated[
        list[EventType] | None,
        Query(description="Only events of these types (repeat the parameter for several)"),
    ] = None,
    message_id: Annotated[UUID | None, Query(description="Only events of this message")] = None,
    recipient: Annotated[
        str | None, Query(max_length=320, description="Only events of deliveries to this address")
    ] = None,
    since: Annotated[
        Instant | None, Query(description="At or after (ISO 8601; UTC if no zone)")
    ] = None,
    until: Annotated[Instant | None, Query(description="Before")] = None,
    cursor: Annotated[UUID | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    order: Annotated[
        Literal["desc", "asc"],
        Query(description="`desc`: newest first; `asc`: oldest first, to follow a feed"),
    ] = "desc",
) -> dict[str, Any]:
    """The caller's events, a page at a time."""
    data, next_cursor = await run_in_threadpool(
        lambda: query_events(
            request.app.state.store,
            app_id,
            types=[str(t) for t in type] if type else None,
            message_id=message_id,
            recipient=recipient,
            since=since,
            until=until,
            cursor=cursor,
            limit=limit,
            order=order,
        )
    )
    return {"data": data, "next_cursor": next_cursor}
