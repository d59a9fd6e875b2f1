"""Inbound mail over HTTP: routes under /api/v1/routes, the inbound log under /api/v1/inbound
(search, one message parsed with its hand-off attempts, release, replay), and the signed links
to large attachments."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.endpoints.destinations import DestinationPolicy
from postbode.inbound import manage, routes
from postbode.inbound.links import PATH, AttachmentLinks
from postbode.store.engine import Store
from postbode.web.api.fields import ApiInput, RowId
from postbode.web.auth import ApiApp
from postbode.web.errors import ApiError

PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
T = TypeVar("T")

router = APIRouter(prefix="/api/v1/routes", tags=["inbound"])
inbound_router = APIRouter(prefix="/api/v1/inbound", tags=["inbound"])
links_router = APIRouter(include_in_schema=False)

Action = Literal["post", "hold", "reject"]
Format = Literal["native", "postmark"]
Status = Literal["pending", "sending", "delivered", "held", "failed"]


class RouteIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    match: str = Field(
        max_length=320,
        description="`local@domain` (also takes `local+hash@domain`) or `*@domain`, at one "
        "of the app's inbound domains",
    )
    url: str | None = Field(None, max_length=2000, description="http:// or https:// URL")
    action: Action = "post"
    format: Format = "native"


class RoutePatch(ApiInput):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2000)
    action: Action | None = None
    format: Format | None = None
    enabled: bool | None = None


class RouteOut(BaseModel):
    id: int
    match: str
    action: str
    url: str | None
    format: str
    enabled: bool
    created_at: datetime


class RouteCreated(RouteOut):
    secret: str = Field(description="`whsec_…`: signs every hand-off; shown this once")


class RouteList(BaseModel):
    data: list[RouteOut]


class AttemptOut(BaseModel):
    started_at: datetime
    duration_ms: int
    url: str
    status_code: int | None
    error: str | None
    response_body: str | None = Field(description="A short excerpt of the response body")


class InboundOut(BaseModel):
    id: UUID
    route_id: int | None
    match: str | None
    action: str
    status: Status
    mail_from: str
    rcpt_to: str
    mailbox_hash: str
    from_header: str
    subject: str
    message_id_header: str | None
    size: int
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    received_at: datetime
    delivered_at: datetime | None
    verification: dict[str, Any] | None = Field(description="SPF, DKIM and DMARC results")


class InboundDetail(InboundOut):
    client_ip: str | None
    helo: str | None
    parsed: dict[str, Any]
    attempt_log: list[AttemptOut] = Field(description="Oldest first")


class InboundList(BaseModel):
    data: list[InboundOut] = Field(description="Newest first")
    next_cursor: UUID | None


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:  # no text column of PostgreSQL holds one
        raise ValueError("must not contain NUL characters")
    return value


async def _call(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    store: Store = request.app.state.store
    try:
        return await run_in_threadpool(fn, store, *args, **kwargs)
    except routes.RouteError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None


# -- routes -------------------------------------------------------------------------------------


def _policy(request: Request) -> DestinationPolicy:
    """Where route URLs may point: public addresses, and what the operator allows."""
    return DestinationPolicy.from_settings(request.app.state.settings)


@router.post("", status_code=201, response_model=RouteCreated)
async def create_route(body: RouteIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """A new route. Its signing secret is in this answer and nowhere else. Its URL must be
    a public destination (or one the operator allows), as for webhooks."""
    return await _call(
        request,
        routes.create_route,
        app_id,
        body.match,
        url=body.url,
        action=body.action,
        format=body.format,
        policy=_policy(request),
    )


@router.get("", response_model=RouteList)
async def list_routes(request: Request, app_id: ApiApp) -> dict[str, Any]:
    return {"data": await _call(request, routes.list_routes, app_id)}


@router.get("/{route_id}", response_model=RouteOut)
async def get_route(route_id: RowId, request: Request, app_id: ApiApp) -> dict[str, Any]:
    return await _call(request, routes.get_route, app_id, route_id)


@router.patch("/{route_id}", response_model=RouteOut)
async def update_route(
    route_id: RowId, body: RoutePatch, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    return await _call(
        request,
        routes.update_route,
        app_id,
        route_id,
        policy=_policy(request),
        **body.model_dump(exclude_unset=True),
    )


@router.delete("/{route_id}", status_code=204)
async def delete_route(route_id: RowId, request: Request, app_id: ApiApp) -> Response:
    await _call(request, routes.delete_route, app_id, route_id)
    return Response(status_code=204)


# -- inbound messages ---------------------------------------------------------------------------


@inbound_router.get("", response_model=InboundList)
async def list_inbound(
    request: Request,
    app_id: ApiApp,
    status: Annotated[Status | None, Query()] = None,
    q: Annotated[
        str | None,
        Query(max_length=200, description="Sender, recipient, From or Subject"),
        AfterValidator(_no_nul),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    cursor: Annotated[UUID | None, Query(description="`next_cursor` of the previous page")] = None,
) -> dict[str, Any]:
    """Inbound messages, newest first."""
    data, next_cursor = await _call(
        request, manage.list_messages, app_id, status=status, q=q, cursor=cursor, limit=limit
    )
    return {"data": data, "next_cursor": next_cursor}


@inbound_router.get("/{inbound_id}", response_model=InboundDetail)
async def get_inbound(inbound_id: UUID, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """One message: as parsed, with its verification and every hand-off attempt."""
    return await _call(request, manage.get_message, app_id, inbound_id)


@inbound_router.get("/{inbound_id}/raw", response_class=Response)
async def raw_inbound(inbound_id: UUID, request: Request, app_id: ApiApp) -> Response:
    """The message as received (RFC 5322), with Postbode's Received line on top."""
    raw = await _call(request, manage.raw_message, app_id, inbound_id)
    return Response(raw, media_type="message/rfc822")


@inbound_router.post("/{inbound_id}/release", response_model=InboundOut)
async def release_inbound(inbound_id: UUID, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Hand a held message to its route's URL now."""
    return await _call(request, manage.release, app_id, inbound_id)


@inbound_router.post("/{inbound_id}/replay", response_model=InboundOut)
async def replay_inbound(inbound_id: UUID, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Hand a delivered or failed message to its route again."""
    return await _call(request, manage.replay, app_id, inbound_id)


# -- signed attachment links ------------------------------------------------------------------


@links_router.get(PATH + "/{inbound_id}/{index}")
async def attachment(
    inbound_id: UUID,
    index: int,
    request: Request,
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=64)],
) -> Response:
    """An attachment too large for the hand-off, by the signed link in it (no login)."""
    store: Store = request.app.state.store
    links = await run_in_threadpool(
        AttachmentLinks.from_settings, request.app.state.settings, store
    )
    if not 0 <= index <= 10_000 or not links.valid(inbound_id, index, expires, signature):
        raise ApiError(404, "not_found", "no such attachment, or the link expired")
    try:
        name, content_type, content = await run_in_threadpool(
            manage.attachment, store, inbound_id, index
        )
    except routes.RouteError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "attachment"
    return Response(
        content,
        media_type=content_type if "/" in content_type else "application/octet-stream",
        headers={
            "content-disposition": f'attachment; filename="{safe}"',
            "x-content-type-options": "nosniff",
            "content-security-policy": "sandbox",  # never a page of this origin
            "cache-control": "private, no-store",
        },
    )
