"""The suppression list page: list and search, add, remove, CSV import and export."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from postbode.bounces import suppression
from postbode.privacy.audit import EXPORT_CSV
from postbode.web.ui.core import (
    CanChange,
    SignedIn,
    UiError,
    UiRoute,
    UploadRoute,
    audit,
    audit_now,
    pick_app,
    redirect,
    render,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50
IMPORT_CHUNK = 1000
MAX_IMPORT_ROWS = 100_000
MAX_SHOWN_ERRORS = 50


def _search(params: Any) -> dict[str, str]:
    return {
        "email": str(params.get("email") or "").strip()[: suppression.MAX_EMAIL],
        "reason": str(params.get("reason") or "").strip()[:32],
        "stream": str(params.get("stream") or "").strip()
        if params.get("stream") in suppression.STREAMS
        else "",
    }


@router.get("/suppressions")
async def suppressions_page(
    request: Request, viewer: SignedIn, cursor: int | None = None
) -> Response:
    app = pick_app(viewer)
    wanted = _search(request.query_params)
    email: str | None = None
    if wanted["email"]:
        try:
            email = suppression.normalise_email(wanted["email"])
        except suppression.SuppressionError as exc:
            raise UiError(400, exc.message) from None
    store = store_of(request)

    def load() -> tuple[list[dict[str, Any]], int | None]:
        with store.read() as conn:
            return suppression.page(
                conn,
                app.id,
                email=email,
                reason=wanted["reason"] or None,
                stream=wanted["stream"] or None,
                after=cursor,
                limit=PAGE_SIZE,
            )

    rows, after = await run_in_threadpool(load)
    return render(
        request,
        "suppressions.html",
        {
            "rows": rows,
            "wanted": wanted,
            "streams": suppression.STREAMS,
            "next_url": url("/suppressions", viewer, **wanted, cursor=after) if after else None,
            "export_url": url("/suppressions/export.csv", viewer, **wanted),
        },
    )


@router.post("/suppressions")
async def add(request: Request, viewer: CanChange) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    back = url("/suppressions", viewer)
    try:
        entry = suppression.make_entry(
            str(form.get("email", "")),
            str(form.get("reason") or "manual"),
            str(form.get("stream") or "all"),
            str(form.get("expires_at") or "") or None,
        )
    except suppression.SuppressionError as exc:
        return redirect(request, back, exc.message, "error")
    store = store_of(request)

    def run() -> int:
        with store.write() as conn:
            added = suppression.suppress_many(conn, app.id, [entry], source="manual")
            audit(
                conn,
                viewer,
                request,
                "suppression.add",
                entry.email,
                {"app": app.name, "stream": entry.stream, "reason": entry.reason},
            )
        return added

    added = await run_in_threadpool(run)
    note = "added to" if added else "already on"
    return redirect(request, back, f"{entry.email} {note} the suppression list ({entry.stream}).")


@router.post("/suppressions/remove")
async def remove(request: Request, viewer: CanChange) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    back = url("/suppressions", viewer)
    stream = str(form.get("stream") or "")
    try:
        email = suppression.normalise_email(str(form.get("email", "")))
    except suppression.SuppressionError as exc:
        return redirect(request, back, exc.message, "error")
    if stream and stream not in suppression.STREAMS:
        return redirect(request, back, "Unknown stream.", "error")
    store = store_of(request)

    def run() -> int:
        with store.write() as conn:
            removed = suppression.unsuppress(conn, app.id, email, stream or None)
            if removed:
                audit(
                    conn,
                    viewer,
                    request,
                    "suppression.remove",
                    email,
                    {"app": app.name, "stream": stream or "every stream", "removed": removed},
                )
        return removed

    removed = await run_in_threadpool(run)
    if not removed:
        return redirect(request, back, f"{email} was not on the suppression list.", "error")
    return redirect(request, back, f"{email} removed from the suppression list.")


async def import_csv(request: Request, viewer: CanChange) -> Response:
    """Read an uploaded CSV (header row naming `email`; `reason`, `stream`, `expires_at` if
    given) and add its good rows; the bad ones are listed by line."""
    app = pick_app(viewer)
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UiError(400, "Choose a CSV file to import.")
    data = await upload.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UiError(422, f"The file is not UTF-8 (byte {exc.start}).") from None
    try:
        entries, errors = suppression.read_csv(text, max_rows=MAX_IMPORT_ROWS)
    except suppression.SuppressionError as exc:
        raise UiError(422, exc.message) from None
    store = store_of(request)

    def run() -> int:
        added = 0
        with store.write() as conn:
            for start in range(0, len(entries), IMPORT_CHUNK):
                chunk = entries[start : start + IMPORT_CHUNK]
                added += suppression.suppress_many(conn, app.id, chunk, source="import")
            audit(
                conn,
                viewer,
                request,
                "suppression.import",
                upload.filename or "",
                {
                    "app": app.name,
                    "rows": len(entries) + len(errors),
                    "added": added,
                    "refused": len(errors),
                },
            )
        return added

    added = await run_in_threadpool(run)
    return render(
        request,
        "suppressions_imported.html",
        {
            "added": added,
            "rows": len(entries) + len(errors),
            "errors": errors[:MAX_SHOWN_ERRORS],
            "more_errors": max(0, len(errors) - MAX_SHOWN_ERRORS),
        },
    )


router.add_api_route(
    "/suppressions/import", import_csv, methods=["POST"], route_class_override=UploadRoute
)


@router.get("/suppressions/export.csv")
async def export(request: Request, viewer: SignedIn) -> Response:
    app = pick_app(viewer)
    wanted = _search(request.query_params)
    store = store_of(request)
    try:
        email = suppression.normalise_email(wanted["email"]) if wanted["email"] else None
    except suppression.SuppressionError as exc:
        raise UiError(400, exc.message) from None
    filters = {k: v for k, v in wanted.items() if v}
    await run_in_threadpool(
        audit_now, store, viewer, request, EXPORT_CSV, f"suppressions:{app.name}", filters
    )

    def lines() -> Iterator[str]:
        yield suppression.csv_header()
        for row in suppression.iter_entries(
            store,
            app.id,
            email=email,
            reason=wanted["reason"] or None,
            stream=wanted["stream"] or None,
        ):
            yield suppression.csv_row(row)

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        lines(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="suppressions-{app.name}-{stamp}.csv"'
        },
    )
