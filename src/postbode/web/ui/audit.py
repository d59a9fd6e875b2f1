"""The audit log page: who changed or looked at what, to which target, when and from where.

Who sees what (docs/privacy.md): owners see the whole organization's log and filter it by
person, action, target and time; admins see the records of their own actions only; viewers
see none (the log itself names people and what they looked at)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import or_, select
from starlette.concurrency import run_in_threadpool

from postbode.store.engine import Store
from postbode.store.schema import audit_log
from postbode.web.ui.core import SignedIn, UiError, UiRoute, parse_time, render, store_of, url

router = APIRouter(route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50


def entries(
    store: Store,
    org_id: int,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    own: tuple[int, str] | None = None,
    since: Any = None,
    until: Any = None,
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
    if target:
        query = query.where(audit_log.c.target == target.strip())
    if own is not None:  # (user id, e-mail): one person's actions (a sign-in has no id yet)
        query = query.where(or_(audit_log.c.user_id == own[0], audit_log.c.actor == own[1].lower()))
    if since is not None:
        query = query.where(audit_log.c.created_at >= since)
    if until is not None:
        query = query.where(audit_log.c.created_at < until)
    if before is not None:
        query = query.where(audit_log.c.id < before)
    with store.read() as conn:
        rows = conn.execute(query.order_by(audit_log.c.id.desc()).limit(limit + 1)).mappings().all()
    page = [dict(r) for r in rows[:limit]]
    return page, page[-1]["id"] if len(rows) > limit else None


@router.get("/audit")
async def audit_page(request: Request, viewer: SignedIn, cursor: int | None = None) -> Response:
    if not viewer.can_change:
        raise UiError(403, "The audit log is for owners (everything) and admins (their own).")
    params = request.query_params
    actor = params.get("actor", "").strip()[:320]
    action = params.get("action", "").strip()[:64]
    target = params.get("target", "").strip()[:200]
    since_text, until_text = params.get("since", "")[:40], params.get("until", "")[:40]
    since, until = parse_time(since_text), parse_time(until_text)
    # admins: their own actions only
    own = None if viewer.is_owner else (viewer.user_id, viewer.email)
    rows, after = await run_in_threadpool(
        lambda: entries(
            store_of(request),
            viewer.org_id,
            actor=actor or None,
            action=action or None,
            target=target or None,
            own=own,
            since=since,
            until=until,
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
            "target": target,
            "since": since_text,
            "until": until_text,
            "own_only": own is not None,
            "next_url": url(
                "/audit",
                viewer,
                actor=actor,
                action=action,
                target=target,
                since=since_text,
                until=until_text,
                cursor=after,
            )
            if after
            else None,
        },
    )
