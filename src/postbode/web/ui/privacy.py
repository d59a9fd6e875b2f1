"""The privacy page (owners only): erase or export one person's data across the organization's
apps, and the organization's retention defaults."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool

from postbode.privacy import erasure, export
from postbode.privacy.audit import RETENTION, Actor
from postbode.store.engine import Store
from postbode.store.schema import apps, organizations
from postbode.web.ui.core import (
    IsOwner,
    UiError,
    UiRoute,
    Viewer,
    audit,
    client_ip,
    redirect,
    render,
    store_of,
    url,
)
from postbode.web.ui.settings import MAX_RETENTION_DAYS

router = APIRouter(route_class=UiRoute, include_in_schema=False)

RETENTION_FIELDS = ("raw_retention_days", "metadata_retention_days", "audit_retention_days")


def _defaults(store: Store, org_id: int) -> dict[str, Any]:
    with store.read() as conn:
        row = (
            conn.execute(
                select(*(organizations.c[f] for f in RETENTION_FIELDS)).where(
                    organizations.c.id == org_id
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


def _actor(viewer: Viewer, request: Request) -> Actor:
    return Actor(viewer.email, viewer.user_id, client_ip(request))


def _scope(viewer: Viewer) -> erasure.Scope:
    return erasure.Scope(viewer.org_id, viewer.org_name, {a.id: a.name for a in viewer.apps})


def _page(request: Request, viewer: Viewer, **context: Any) -> Response:
    defaults = _defaults(store_of(request), viewer.org_id)
    return render(
        request,
        "privacy.html",
        {"defaults": defaults, "email": "", "preview": None, "kinds": erasure.KINDS, **context},
    )


@router.get("/privacy")
async def privacy_page(request: Request, viewer: IsOwner) -> Response:
    return await run_in_threadpool(_page, request, viewer)


@router.post("/privacy/erase")
async def erase_person(request: Request, viewer: IsOwner) -> Response:
    """`preview` counts what would go; `erase` (with the confirmation ticked) erases."""
    form = await request.form()
    email = str(form.get("email", "")).strip()[:320]
    confirmed = form.get("confirm") == "on"
    dry_run = form.get("action") != "erase" or not confirmed
    store = store_of(request)
    try:
        result = await run_in_threadpool(
            lambda: erasure.erase(
                store, email, _scope(viewer), dry_run=dry_run, actor=_actor(viewer, request)
            )
        )
    except erasure.ErasureError as exc:
        raise UiError(422, str(exc)) from None
    if dry_run:
        flash = "Tick the confirmation to erase." if form.get("action") == "erase" else None
        return await run_in_threadpool(
            lambda: _page(request, viewer, email=email, preview=result.as_json(), notice=flash)
        )
    total = sum(result.counts.values())
    text = f"Erased {total} rows about that address; the audit log keeps only its hash."
    if result.in_flight:
        text += f" {result.in_flight} deliveries were being sent: erase again in a minute."
    return redirect(request, url("/privacy", viewer), text, "error" if result.in_flight else "ok")


@router.post("/privacy/export")
async def export_person(request: Request, viewer: IsOwner) -> Response:
    """The export document as a download (a POST, so the address is in no URL or log)."""
    form = await request.form()
    email = str(form.get("email", "")).strip()[:320]
    store = store_of(request)
    try:
        doc = await run_in_threadpool(
            lambda: export.export(store, email, _scope(viewer), actor=_actor(viewer, request))
        )
    except erasure.ErasureError as exc:
        raise UiError(422, str(exc)) from None
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Response(
        json.dumps(doc, indent=2, ensure_ascii=False),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="privacy-export-{stamp}.json"'},
    )


@router.post("/privacy/retention")
async def save_retention(request: Request, viewer: IsOwner) -> Response:
    """The organization's retention defaults (new apps start with them); `apply` sets them on
    every app now."""
    form = await request.form()
    values: dict[str, int] = {}
    for name in RETENTION_FIELDS:
        value = str(form.get(name, "")).strip()
        if not value.isdigit() or not 1 <= int(value) <= MAX_RETENTION_DAYS:
            raise UiError(
                422, f"{name.replace('_', ' ')}: a whole number of days, 1 to {MAX_RETENTION_DAYS}."
            )
        values[name] = int(value)
    apply = form.get("apply") == "on"
    store = store_of(request)

    def run() -> None:
        with store.write() as conn:
            before = dict(
                conn.execute(
                    select(*(organizations.c[f] for f in RETENTION_FIELDS)).where(
                        organizations.c.id == viewer.org_id
                    )
                )
                .mappings()
                .one()
            )
            conn.execute(
                update(organizations).where(organizations.c.id == viewer.org_id).values(**values)
            )
            changed: dict[str, Any] = {
                k: [before[k], v] for k, v in values.items() if before[k] != v
            }
            if apply:
                conn.execute(
                    update(apps)
                    .where(apps.c.organization_id == viewer.org_id)
                    .values(
                        raw_retention_days=values["raw_retention_days"],
                        metadata_retention_days=values["metadata_retention_days"],
                    )
                )
                changed["applied_to_every_app"] = True
            audit(conn, viewer, request, RETENTION, viewer.org_name, changed)

    await run_in_threadpool(run)
    return redirect(request, url("/privacy", viewer), "Retention saved.")
