"""The queue page: deferred and held deliveries grouped by destination and last reply; retry,
cancel or release one, a selection, or everything matching the filter (counted, confirmed)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from postbode.delivery import manage
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages, utcnow
from postbode.web.ui.core import (
    CanChange,
    SignedIn,
    UiError,
    UiRoute,
    audit_now,
    pick_app,
    redirect,
    render,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50
MAX_SELECTED = 1000
# The tabs of the queue page: which states each shows.
VIEWS: dict[str, tuple[str, ...]] = {
    "waiting": manage.QUEUE_STATUSES,
    "deferred": ("deferred",),
    "held": ("held",),
    "queued": ("queued",),
    "sending": ("sending",),
    "failed": ("failed",),
}
VERBS = {"retry": "retried", "cancel": "cancelled", "release": "released"}


def _view(name: str | None) -> str:
    return name if name in VIEWS else "waiting"


def _filter_from(source: Any) -> dict[str, str]:
    """The queue filter in a query string or form: view, domain, tag."""
    return {
        "view": _view(source.get("view")),
        "domain": str(source.get("domain") or "").strip().lower()[:253],
        "tag": str(source.get("tag") or "").strip()[:100],
    }


@router.get("/queue")
async def queue_page(
    request: Request, viewer: SignedIn, cursor: uuid.UUID | None = None
) -> Response:
    app = pick_app(viewer)
    flt = _filter_from(request.query_params)
    store = store_of(request)

    def load() -> tuple[dict[str, Any], list[dict[str, Any]], uuid.UUID | None]:
        summary = manage.queue_summary(store, app.id)
        rows, next_cursor = manage.list_deliveries(
            store,
            app.id,
            status=VIEWS[flt["view"]],
            recipient_domain=flt["domain"] or None,
            tag=flt["tag"] or None,
            cursor=cursor,
            limit=PAGE_SIZE,
        )
        return summary, rows, next_cursor

    summary, rows, next_cursor = await run_in_threadpool(load)
    return render(
        request,
        "queue.html",
        {
            "summary": summary,
            "rows": rows,
            "flt": flt,
            "views": list(VIEWS),
            "actions": manage.ACTIONS,
            # Bulk buttons only for actions that apply to some state this tab shows.
            "bulk_actions": [
                act.name for act in manage.ACTIONS.values() if _statuses(act.name, flt["view"])
            ],
            "next_url": url("/queue", viewer, **flt, cursor=str(next_cursor))
            if next_cursor
            else None,
        },
    )


def _statuses(action: manage.ActionName, view: str) -> tuple[str, ...]:
    """The states an action over a tab changes: the tab's states it applies to."""
    return tuple(s for s in VIEWS[view] if s in manage.ACTIONS[action].sources)


def _where(
    form: FormData, action: manage.ActionName, scope: str
) -> tuple[manage.DeliveryFilter, str]:
    """The deliveries a bulk form names (`scope` selected: the ids ticked; else the filter),
    and a description."""
    flt = _filter_from(form)
    statuses = _statuses(action, flt["view"])
    if not statuses:
        raise UiError(
            422,
            f"{action.capitalize()} applies to {', '.join(manage.ACTIONS[action].sources)} "
            f"deliveries; the {flt['view']} tab shows none of those.",
        )
    if scope == "selected":
        raw_ids = form.getlist("ids")
        if not raw_ids:
            raise UiError(422, "Select at least one delivery first.")
        if len(raw_ids) > MAX_SELECTED:
            raise UiError(422, f"Select at most {MAX_SELECTED} deliveries, or use the filter.")
        try:
            ids = [uuid.UUID(str(i)) for i in raw_ids]
        except ValueError:
            raise UiError(400, "Not a delivery id.") from None
        return manage.DeliveryFilter(status=statuses, ids=ids), "the selected deliveries"
    where = manage.DeliveryFilter(
        status=statuses,
        recipient_domain=flt["domain"] or None,
        tag=flt["tag"] or None,
    )
    parts = [f"{', '.join(statuses)}"]
    if flt["domain"]:
        parts.append(f"to {flt['domain']}")
    if flt["tag"]:
        parts.append(f"tagged {flt['tag']}")
    return where, "every " + " ".join(parts) + " delivery"


def count_matching(store: Store, app_id: int, where: manage.DeliveryFilter) -> int:
    """How many deliveries a bulk change with `where` would look at now (rows being sent at the
    moment are skipped by the change itself). Index: deliveries (app_id, status, domain)."""
    conds = [deliveries.c.app_id == app_id, deliveries.c.status.in_(list(where.status or ()))]
    query = select(func.count()).select_from(deliveries)
    if where.recipient_domain is not None:
        conds.append(deliveries.c.recipient_domain == where.recipient_domain)
    if where.tag is not None:
        query = query.join(messages, messages.c.id == deliveries.c.message_id)
        conds.append(messages.c.tag == where.tag)
    if where.older_than_seconds is not None:
        cutoff = utcnow() - timedelta(seconds=where.older_than_seconds)
        conds.append(deliveries.c.first_queued_at <= cutoff)
    if where.ids is not None:
        conds.append(deliveries.c.id.in_(list(where.ids)))
    with store.read() as conn:
        return int(conn.execute(query.where(*conds)).scalar_one())


def _scope(request: Request, form: FormData) -> str:
    """`selected` or `filter`: the bulk buttons say it in their URL, the confirmation form in
    a field."""
    scope = request.query_params.get("scope") or str(form.get("scope") or "")
    if scope not in ("selected", "filter"):
        raise UiError(400, "Say whether the selection or the whole filter is meant.")
    return scope


def _action(value: object) -> manage.ActionName:
    if value not in manage.ACTIONS:
        raise UiError(400, "Choose retry, cancel or release.")
    return value  # type: ignore[return-value]


@router.post("/queue/confirm")
async def confirm(request: Request, viewer: CanChange) -> Response:
    """Step one of a bulk change: count what it would change and ask."""
    app = pick_app(viewer)
    form = await request.form()
    action = _action(form.get("action"))
    scope = _scope(request, form)
    flt = _filter_from(form)
    if scope == "selected" and not form.getlist("ids"):
        return redirect(
            request,
            url("/queue", viewer, **flt),
            f"Nothing selected: tick the deliveries to {action} first, or use "
            f"“{action.capitalize()} all…” for everything in this view.",
            "error",
        )
    where, described = _where(form, action, scope)
    count = await run_in_threadpool(count_matching, store_of(request), app.id, where)
    return render(
        request,
        "queue_confirm.html",
        {
            "action": action,
            "count": count,
            "described": described,
            "flt": flt,
            "scope": scope,
            "ids": [str(i) for i in where.ids or ()],
            "back": url("/queue", viewer, **flt),
        },
    )


@router.post("/queue/apply")
async def apply(request: Request, viewer: CanChange) -> Response:
    """Step two: make the change, 500 deliveries per transaction, each with its event."""
    app = pick_app(viewer)
    form = await request.form()
    action = _action(form.get("action"))
    where, described = _where(form, action, _scope(request, form))
    store = store_of(request)
    try:
        changed = await run_in_threadpool(
            manage.change_many, store, app.id, action, where, by=viewer.email
        )
    except manage.ManageError as exc:
        raise UiError(422, exc.message) from None
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        f"deliveries.{action}",
        app.name,
        {
            "changed": changed,
            "described": described,
            "statuses": list(where.status or ()),
            "recipient_domain": where.recipient_domain,
            "tag": where.tag,
            "ids": [str(i) for i in where.ids][:MAX_SELECTED] if where.ids else None,
        },
    )
    flt = _filter_from(form)
    noun = "delivery" if changed == 1 else "deliveries"
    return redirect(request, url("/queue", viewer, **flt), f"{changed} {noun} {VERBS[action]}.")


@router.post("/queue/{delivery_id}/{action}")
async def change_one(
    request: Request, viewer: CanChange, delivery_id: uuid.UUID, action: str
) -> Response:
    app = pick_app(viewer)
    act = _action(action)
    form = await request.form()
    back = url("/queue", viewer, **_filter_from(form))
    store = store_of(request)
    try:
        row = await run_in_threadpool(
            manage.change_one, store, app.id, delivery_id, act, by=viewer.email
        )
    except manage.ManageError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        f"delivery.{act}",
        str(delivery_id),
        {"recipient": row["recipient"], "message_id": str(row["message_id"]), "app": app.name},
    )
    return redirect(request, back, f"Delivery to {row['recipient']} {VERBS[act]}.")
