"""The queue management API: list, retry, cancel and release deliveries, and the queue summary."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from postbode.delivery import manage
from postbode.store.engine import Store
from postbode.store.schema import DeliveryStatus
from postbode.web.api.fields import MAX_SECONDS, ApiInput
from postbode.web.auth import ApiApp, AuthenticatedRoute
from postbode.web.errors import ApiError

MAX_PAGE_SIZE = 500
MAX_IDS = 10_000

T = TypeVar("T")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


class Delivery(BaseModel):
    id: UUID
    message_id: UUID
    recipient: str
    recipient_domain: str
    status: DeliveryStatus
    attempts: int
    first_queued_at: datetime
    next_attempt_at: datetime | None = Field(
        description="When it is tried next (queued, deferred and sending deliveries only)"
    )
    last_attempt_at: datetime | None
    last_reply: str | None = Field(
        description="The remote's last reply, or why it waits: `waiting: rate limit for …`"
    )
    mx: str | None
    error: str | None = Field(description="Why Postbode itself parked it (a bug), if it did")
    tag: str | None
    stream: str
    subject: str


class DeliveryList(BaseModel):
    data: list[Delivery] = Field(description="Oldest first")
    next_cursor: UUID | None = Field(description="Pass as `cursor` for the next page")


class BulkFilter(ApiInput):
    """Which deliveries to change; every field given must match, at least one must be given."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not widen a bulk cancel

    status: list[DeliveryStatus] | None = Field(
        None, description="A state or a list of them; default: every state the action applies to"
    )
    recipient_domain: str | None = Field(None, max_length=253)
    tag: str | None = Field(None, max_length=100)
    older_than_seconds: float | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Queued at least this many seconds ago",
    )
    ids: list[UUID] | None = Field(None, max_length=MAX_IDS)

    @field_validator("status", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class Changed(BaseModel):
    changed: int


class ByDomain(BaseModel):
    recipient_domain: str
    count: int


class ByReply(BaseModel):
    last_reply: str | None = Field(description=f"The first {manage.REPLY_CHARS} characters")
    count: int


class Waiting(BaseModel):
    count: int
    by_recipient_domain: list[ByDomain] = Field(description="Largest groups first")
    by_last_reply: list[ByReply] = Field(description="Largest groups first")


class QueueSummary(BaseModel):
    counts: dict[str, int] = Field(description="Deliveries per queue state")
    oldest_queued_seconds: float | None = Field(
        description="Age of the oldest queued or deferred delivery"
    )
    deferred: Waiting
    held: Waiting


router = APIRouter(
    prefix="/api/v1", tags=["queue"], responses=_errors(401, 422), route_class=AuthenticatedRoute
)


async def _call(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a manage function in a thread, answering its errors in the JSON error shape."""
    store: Store = request.app.state.store
    try:
        return await run_in_threadpool(fn, store, *args, **kwargs)
    except manage.NotFound as exc:
        raise ApiError(404, exc.code, exc.message, exc.field) from None
    except manage.WrongState as exc:
        raise ApiError(409, exc.code, exc.message, exc.field) from None
    except manage.BadFilter as exc:
        raise ApiError(422, exc.code, exc.message, exc.field) from None


@router.get("/deliveries", response_model=DeliveryList, summary="The queue, oldest first")
async def list_deliveries(
    request: Request,
    app_id: ApiApp,
    status: Annotated[
        list[DeliveryStatus] | None,
        Query(description="State(s), repeatable; default: queued, deferred, sending and held"),
    ] = None,
    recipient_domain: Annotated[str | None, Query(max_length=253)] = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Annotated[UUID | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
) -> dict[str, Any]:
    """The caller's deliveries with why each waits (`last_reply`) and when it is tried next
    (`next_attempt_at`), a page at a time (keyset pagination on the time-ordered id)."""
    page, next_cursor = await _call(
        request,
        manage.list_deliveries,
        app_id,
        status=status,
        recipient_domain=recipient_domain,
        tag=tag,
        cursor=cursor,
        limit=limit,
    )
    return {"data": page, "next_cursor": next_cursor}


@router.get("/queue/summary", response_model=QueueSummary, summary="What waits in the queue")
async def queue_summary(request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Counts per queue state; deferred and held deliveries grouped by recipient domain and
    by last reply; the age of the oldest undelivered delivery."""
    return await _call(request, manage.queue_summary, app_id)


def _bulk(action: manage.ActionName) -> Callable[..., Any]:
    async def endpoint(request: Request, app_id: ApiApp, body: BulkFilter) -> dict[str, int]:
        where = manage.DeliveryFilter(
            status=body.status,
            recipient_domain=body.recipient_domain,
            tag=body.tag,
            older_than_seconds=body.older_than_seconds,
            ids=body.ids,
        )
        changed = await _call(request, manage.change_many, app_id, action, where)
        return {"changed": changed}

    return endpoint


def _one(action: manage.ActionName) -> Callable[..., Any]:
    async def endpoint(request: Request, app_id: ApiApp, id: UUID) -> dict[str, Any]:
        return await _call(request, manage.change_one, app_id, id, action)

    return endpoint


_DOCS: dict[manage.ActionName, tuple[str, str]] = {
    "retry": (
        "Make due now",
        "A deferred, held or failed delivery is queued again and tried at once (a failed one "
        "gets a fresh maximum age; event `delivery.retried`, or `delivery.released` for a held "
        "one). Shaping still applies: a destination at its limit makes it wait for a slot.",
    ),
    "cancel": (
        "Cancel",
        "A scheduled, queued, deferred or held delivery is cancelled and never sent "
        "(event `delivery.cancelled`).",
    ),
    "release": (
        "Release from hold",
        "A held delivery is queued again and tried at once (event `delivery.released`).",
    ),
}

for _action, (_summary, _description) in _DOCS.items():
    router.add_api_route(
        f"/deliveries/{_action}",
        _bulk(_action),
        methods=["POST"],
        response_model=Changed,
        summary=f"{_summary}: every delivery matching a filter",
        description=_description
        + " Changes are made 500 at a time, each with its event; deliveries being sent "
        "right now are skipped.",
        responses=_errors(422),
    )
    router.add_api_route(
        f"/deliveries/{{id}}/{_action}",
        _one(_action),
        methods=["POST"],
        response_model=Delivery,
        summary=f"{_summary}: one delivery",
        description=_description + " Any other state answers 409.",
        responses=_errors(404, 409),
    )


@router.post(
    "/messages/{id}/cancel",
    response_model=Changed,
    summary="Cancel: every delivery of a message not sent yet",
    responses=_errors(404),
)
async def cancel_message(request: Request, app_id: ApiApp, id: UUID) -> dict[str, Any]:
    """Every scheduled, queued, deferred or held delivery of the message is cancelled and never
    sent (event `delivery.cancelled` each); `changed` counts them (0 when none was left to
    cancel). A delivery being sent right now is not touched. Another app's message is 404."""
    changed = await _call(request, manage.cancel_message, app_id, id)
    return {"changed": changed}
