"""The audit log page: who changed what, to which target, when and from where."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from postbode.store.engine import Store
from postbode.store.schema import audit_log
from postbode.web.ui.core import SignedIn, UiRoute, render, store_of, url

router = APIRouter(route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50


def entries(
    store: Store,
    org_id: int,
    *,
    actor: str | None = None,
    action: str | None = None,
    before: int | None = None,
    limit: int = PAGE_SIZE,
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of the organization's audit log, newest first (keyset on id), and the cursor of
    the next. `action` ending in `.` matches every action it starts (`delivery.`)."""
    query = select(audit_log).where(audit_log.c.organization_id == org_id)
    if actor:
        query = query.where(audit_log.c.actor == actor.strip().lower())
    if action:
        if action.endswith("."):
            query = query.where(audit_log.c.action.startswith(action, autoescape=True))
        else:
            query = query.where(audit_log.c.action == action)
    if before is not None:
        query = query.where(audit_log.c.id < before)
    with store.read() as conn:
        rows = conn.execute(query.order_by(audit_log.c.id.desc()).limit(limit + 1)).mappings().all()
    page = [dict(r) for r in rows[:limit]]
    return page, page[-1]["id"] if len(rows) > limit else None


@router.get("/audit")
async def audit_page(request: Request, viewer: SignedIn, cursor: int | None = None) -> Response:
    actor = request.query_params.get("actor", "").strip()[:320]
    action = request.query_params.get("action", "").strip()[:64]
    rows, after = await run_in_threadpool(
        lambda: entries(
            store_of(request),
            viewer.org_id,
            actor=actor or None,
            action=action or None,
            before=cursor,
        )
    )
    return render(
        request,
        "audit.html",
        {
            "rows": rows,
            "actor": actor,
            "action": action,
            "next_url": url("/audit", viewer, actor=actor, action=action, cursor=after)
            if after
            else None,
        },
    )
