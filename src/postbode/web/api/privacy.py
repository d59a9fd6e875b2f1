"""The privacy API: POST /api/v1/privacy/erasures (erase one person's data) and
GET /api/v1/privacy/exports/{email} (everything held about one person, as JSON). An API key
acts for its own app: erasure and export cover that app's data."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from postbode.privacy import erasure, export
from postbode.privacy.audit import Actor
from postbode.store.engine import Store
from postbode.store.schema import apps
from postbode.web.auth import ApiApp
from postbode.web.errors import ApiError

router = APIRouter(prefix="/api/v1/privacy", tags=["privacy"])


class ErasureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=320, description="The person's address")
    dry_run: bool = Field(False, description="Count what would be erased; change nothing")


class ErasureOut(BaseModel):
    address_hash: str = Field(description="The keyed hash the audit log and suppressions keep")
    organization: str
    apps: list[str]
    dry_run: bool
    counts: dict[str, int] = Field(description="Rows removed or hashed, by kind")
    total: int
    in_flight: int = Field(description="Deliveries being sent right now: erase again later")
    complete: bool
    wal_truncated: bool | None = Field(description="SQLite: the WAL was emptied afterwards")
    at: str


def _actor(store: Store, app_id: int, request: Request) -> Actor:
    with store.read() as conn:
        name = conn.execute(select(apps.c.name).where(apps.c.id == app_id)).scalar_one()
    return Actor(f"api:{name}", ip=request.client.host if request.client else None)


@router.post("/erasures", response_model=ErasureOut)
async def create_erasure(body: ErasureIn, app_id: ApiApp, request: Request) -> Any:
    """Erase everything the app holds about one address: messages' bodies and headers where it
    is a recipient, deliveries, attempts, events, opens and clicks, webhook logs, inbound
    mail, idempotency records; suppressions stay as a keyed hash (so the address stays
    suppressed). 200 with counts per kind; `complete` is false while mail to the address was
    being sent (erase again a minute later)."""
    store: Store = request.app.state.store

    def run() -> erasure.Erasure:
        scope = erasure.resolve_scope(store, app_id=app_id)
        actor = _actor(store, app_id, request)
        return erasure.erase(store, body.email, scope, dry_run=body.dry_run, actor=actor)

    try:
        result = await run_in_threadpool(run)
    except erasure.ErasureError as exc:
        raise ApiError(422, "invalid", str(exc), "email") from None
    return result.as_json()


@router.get("/exports/{email}")
async def export_person(email: str, app_id: ApiApp, request: Request) -> JSONResponse:
    """Everything the app holds about one address as one JSON document (`schema`
    `postbode.privacy.export`, `schema_version` 1): messages with their stored source,
    deliveries with attempts and events (opens and clicks with IP network and user agent
    family), suppressions, inbound messages, webhook requests, and counts."""
    store: Store = request.app.state.store

    def run() -> dict[str, Any]:
        scope = erasure.resolve_scope(store, app_id=app_id)
        return export.export(store, email, scope, actor=_actor(store, app_id, request))

    try:
        doc = await run_in_threadpool(run)
    except erasure.ErasureError as exc:
        raise ApiError(422, "invalid", str(exc), "email") from None
    return JSONResponse(doc, headers={"Cache-Control": "no-store"})
