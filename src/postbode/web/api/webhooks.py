"""The webhooks API under /api/v1/webhooks: endpoints, secrets, the delivery log and replays."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.endpoints.destinations import MAX_URL_LENGTH, DestinationPolicy
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.web.api.fields import ApiInput, RowId
from postbode.web.auth import ApiApp, AuthenticatedRoute
from postbode.web.errors import ApiError
from postbode.webhooks import manage

PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
T = TypeVar("T")

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], route_class=AuthenticatedRoute)


WebhookFormat = Literal["native", "postmark", "sendgrid", "mailgun"]


class WebhookIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_LENGTH, description="http:// or https:// URL")
    event_types: list[EventType] = Field(
        default_factory=list, description="Event types sent; empty: every type"
    )
    enabled: bool = True
    format: WebhookFormat = "native"


class WebhookPatch(ApiInput):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=MAX_URL_LENGTH)
    event_types: list[EventType] | None = None
    enabled: bool | None = Field(None, description="Enabling clears `disabled_reason`")
    format: WebhookFormat | None = None


class WebhookOut(BaseModel):
    id: int
    url: str
    event_types: list[str]
    format: str
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None = Field(description="First failure since the last success")
    previous_secret_expires_at: datetime | None = Field(
        description="While set, requests carry a second signature made with the previous secret"
    )
    created_at: datetime
    verification_key: str | None = Field(
        None,
        description="`sendgrid` format: the public key (base64 DER) that verifies the ECDSA "
        "signatures, as SendGrid shows it",
    )


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="`whsec_…`: shown this once (the `mailgun` format's signing key)"
    )


class WebhookList(BaseModel):
    data: list[WebhookOut]


class RotatedSecret(BaseModel):
    secret: str = Field(description="The new secret: shown this once")
    previous_secret_expires_at: datetime
    verification_key: str | None = Field(
        None, description="`sendgrid` format: the new public key (the old one stops at once)"
    )


class AttemptOut(BaseModel):
    started_at: datetime
    status_code: int | None
    duration_ms: int = Field(description="Response time")
    error: str | None
    response_body: str | None = Field(
        description="The start of the response body: one line of printable text, 200 "
        "characters at most"
    )


class RequestOut(BaseModel):
    id: UUID
    event_id: UUID
    event_type: str | None
    status: Literal["pending", "sending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    attempt_log: list[AttemptOut] = Field(description="Oldest first")


class RequestList(BaseModel):
    data: list[RequestOut] = Field(description="Newest first")
    next_cursor: UUID | None = Field(description="Pass as `cursor` for the next page")


class ReplayIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    event_id: UUID


class ReplayOut(BaseModel):
    id: UUID = Field(description="The new webhook request")
    event_id: UUID
    status: str
    created_at: datetime


def _policy(request: Request) -> DestinationPolicy:
    """Where webhooks may go: public addresses, and what the operator allows."""
    return DestinationPolicy.from_settings(request.app.state.settings)


async def _call(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store function off the event loop; its WebhookError becomes the JSON error."""
    store: Store = request.app.state.store
    try:
        return await run_in_threadpool(fn, store, *args, **kwargs)
    except manage.WebhookError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None


@router.post("", status_code=201, response_model=WebhookCreated)
async def create_webhook(body: WebhookIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """A new endpoint. Its secret is in this answer and nowhere else."""
    return await _call(
        request,
        manage.create_webhook,
        app_id,
        body.url,
        [str(t) for t in body.event_types],
        enabled=body.enabled,
        format=body.format,
        policy=_policy(request),
    )


@router.get("", response_model=WebhookList)
async def list_webhooks(request: Request, app_id: ApiApp) -> dict[str, Any]:
    return {"data": await _call(request, manage.list_webhooks, app_id)}


@router.get("/{webhook_id}", response_model=WebhookOut)
async def get_webhook(webhook_id: RowId, request: Request, app_id: ApiApp) -> dict[str, Any]:
    return await _call(request, manage.get_webhook, app_id, webhook_id)


@router.patch("/{webhook_id}", response_model=WebhookOut)
async def update_webhook(
    webhook_id: RowId, body: WebhookPatch, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    """Change the URL, event types, format, or enable / disable the endpoint."""
    changes = body.model_dump(exclude_unset=True)
    if changes.get("event_types") is not None:
        changes["event_types"] = [str(t) for t in changes["event_types"]]
    return await _call(
        request, manage.update_webhook, app_id, webhook_id, policy=_policy(request), **changes
    )


@router.delete("/{webhook_id}", status_code=204)
async def delete_webhook(webhook_id: RowId, request: Request, app_id: ApiApp) -> Response:
    await _call(request, manage.delete_webhook, app_id, webhook_id)
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=RotatedSecret)
async def rotate_secret(webhook_id: RowId, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """A new secret. For 24 hours every request is signed with both the new and the previous
    secret (`webhook-signature: v1,<new> v1,<previous>`), so the receiver can switch at leisure."""
    return await _call(request, manage.rotate_secret, app_id, webhook_id)


@router.get("/{webhook_id}/requests", response_model=RequestList)
async def list_requests(
    webhook_id: RowId,
    request: Request,
    app_id: ApiApp,
    status: Annotated[Literal["pending", "sending", "delivered", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    cursor: Annotated[UUID | None, Query(description="`next_cursor` of the previous page")] = None,
) -> dict[str, Any]:
    """The delivery log: requests newest first, each with every attempt (time, HTTP status,
    response time, a short excerpt of the response body)."""
    data, next_cursor = await _call(
        request,
        manage.list_requests,
        app_id,
        webhook_id,
        status=status,
        cursor=cursor,
        limit=limit,
    )
    return {"data": data, "next_cursor": next_cursor}


@router.post("/{webhook_id}/replay", status_code=202, response_model=ReplayOut)
async def replay(
    webhook_id: RowId, body: ReplayIn, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    """Send an event to the endpoint again, as a new request."""
    return await _call(request, manage.replay, app_id, webhook_id, body.event_id)
