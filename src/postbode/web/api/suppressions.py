"""The suppression list API: /api/v1/suppressions (list, add, remove, CSV import and export)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.bounces import suppression
from postbode.bounces.suppression import Entry, SuppressionError
from postbode.store.engine import Store
from postbode.web.api.fields import ApiInput
from postbode.web.auth import ApiApp, AuthenticatedRoute
from postbode.web.errors import ApiError

PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_POST_ENTRIES = 1000
MAX_IMPORT_BYTES = 10 * 1024 * 1024
MAX_IMPORT_ROWS = 100_000
EXPORT_CHUNK = 1000
IMPORT_CHUNK = 1000

Stream = Literal["all", "transactional", "broadcast"]

router = APIRouter(
    prefix="/api/v1/suppressions", tags=["suppressions"], route_class=AuthenticatedRoute
)


class SuppressionIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=suppression.MAX_EMAIL)
    reason: str = Field("manual", max_length=32, description="Why, e.g. `manual`")
    stream: Stream = Field("all", description="The stream it applies to; `all`: every stream")


class SuppressionsIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    suppressions: list[SuppressionIn] = Field(min_length=1, max_length=MAX_POST_ENTRIES)


class SuppressionOut(BaseModel):
    email: str
    reason: str
    stream: str
    source: str = Field(description="bounce, complaint, unsubscribe, manual or import")
    created_at: datetime
    expires_at: datetime | None = Field(description="null: for good")


class SuppressionList(BaseModel):
    data: list[SuppressionOut] = Field(description="Oldest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class Created(BaseModel):
    created: int = Field(description="Entries added, or made to last longer")


class ImportRowError(BaseModel):
    line: int
    field: str | None
    message: str


class ImportResult(Created):
    rows: int = Field(description="Rows read (not counting the header and blank lines)")
    errors: list[ImportRowError] = Field(description="Rows not taken, by line number")


class Deleted(BaseModel):
    deleted: int


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _email(value: str | None, field: str = "email") -> str | None:
    if value is None:
        return None
    try:
        return suppression.normalise_email(value)
    except SuppressionError as exc:
        raise ApiError(422, "invalid", exc.message, field) from None


def _cursor(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise ApiError(422, "invalid", "not a cursor from a previous page", "cursor")
    return int(value)


def _out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("email", "reason", "stream", "source", "created_at", "expires_at")}


Email = Annotated[str | None, Query(max_length=suppression.MAX_EMAIL)]
Reason = Annotated[str | None, Query(max_length=32)]


@router.get("", response_model=SuppressionList, summary="List suppressed addresses")
def list_suppressions(
    request: Request,
    app_id: ApiApp,
    email: Email = None,
    reason: Reason = None,
    stream: Stream | None = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
) -> dict[str, Any]:
    """The app's suppressions in force (expired ones are left out), a page at a time."""
    with _store(request).read() as conn:
        rows, after = suppression.page(
            conn,
            app_id,
            email=_email(email),
            reason=reason,
            stream=stream,
            after=_cursor(cursor),
            limit=limit,
        )
    return {"data": [_out(r) for r in rows], "next_cursor": None if after is None else str(after)}


@router.post("", response_model=Created, summary="Suppress one or many addresses")
def add_suppressions(body: SuppressionsIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Add entries (source `manual`); an address already suppressed for good stays as it is."""
    entries: list[Entry] = []
    for i, item in enumerate(body.suppressions):
        try:
            entries.append(suppression.make_entry(item.email, item.reason, item.stream))
        except SuppressionError as exc:
            raise ApiError(422, "invalid", exc.message, f"suppressions.{i}.{exc.field}") from None
    with _store(request).write() as conn:
        created = suppression.suppress_many(conn, app_id, entries, source="manual")
    return {"created": created}


@router.post(
    "/import",
    response_model=ImportResult,
    summary="Import suppressions from CSV",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "A header row naming `email`, optionally `reason`, `stream` and "
            "`expires_at` (other columns, as in an export, are ignored).",
        }
    },
)
async def import_suppressions(request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Add every good row (source `import`); bad rows are reported by line number."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in ("text/csv", "text/plain", "application/csv"):
        raise ApiError(415, "unsupported_media_type", "send the file as Content-Type: text/csv")
    data = await _read_capped(request, MAX_IMPORT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            422, "invalid_csv", f"the file is not UTF-8 (byte {exc.start})", "body"
        ) from None
    try:
        entries, errors = suppression.read_csv(text, max_rows=MAX_IMPORT_ROWS)
    except SuppressionError as exc:
        raise ApiError(422, "invalid_csv", exc.message, "body") from None

    def store_all() -> int:
        created = 0
        with _store(request).write() as conn:
            for start in range(0, len(entries), IMPORT_CHUNK):
                chunk = entries[start : start + IMPORT_CHUNK]
                created += suppression.suppress_many(conn, app_id, chunk, source="import")
        return created

    created = await run_in_threadpool(store_all)
    return {
        "created": created,
        "rows": len(entries) + len(errors),
        "errors": [{"line": e.line, "field": e.field, "message": e.message} for e in errors],
    }


async def _read_capped(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, "too_large", f"the file is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the file is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get(
    "/export",
    summary="Export suppressions as CSV",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def export_suppressions(
    request: Request,
    app_id: ApiApp,
    email: Email = None,
    reason: Reason = None,
    stream: Stream | None = None,
) -> StreamingResponse:
    """Every suppression in force as CSV (email, reason, stream, source, created_at,
    expires_at), streamed as it is read, a chunk of rows at a time."""
    store = _store(request)
    address = _email(email)

    def lines() -> Iterator[str]:
        yield suppression.csv_header()
        for row in suppression.iter_entries(
            store, app_id, email=address, reason=reason, stream=stream, chunk=EXPORT_CHUNK
        ):
            yield suppression.csv_row(row)

    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'},
    )


@router.delete(
    "/{email}", response_model=Deleted, summary="Take an address off the suppression list"
)
def delete_suppression(
    email: str, request: Request, app_id: ApiApp, stream: Stream | None = None
) -> dict[str, Any]:
    """Remove the address's entry for `stream`, or its entries for every stream; 404 when
    there is none."""
    address = _email(email)
    assert address is not None
    with _store(request).write() as conn:
        deleted = suppression.unsuppress(conn, app_id, address, stream)
    if not deleted:
        raise ApiError(404, "not_found", f"{address} is not on the suppression list", "email")
    return {"deleted": deleted}
