"""The Inbound page: the log of inbound mail with search, a message's parsed view with its
verification and hand-off attempts, release and replay, and the app's routes."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from postbode.endpoints.destinations import DestinationPolicy
from postbode.inbound import manage, routes
from postbode.store.schema import INBOUND_STATUSES
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


@router.get("/inbound")
async def inbound_page(
    request: Request, viewer: SignedIn, cursor: uuid.UUID | None = None
) -> Response:
    app = pick_app(viewer)
    q = str(request.query_params.get("q") or "").strip()[:200]
    status = request.query_params.get("status") or None
    if status not in (None, *INBOUND_STATUSES):
        raise UiError(400, "Unknown status.")
    store = store_of(request)

    def load() -> tuple[list[dict[str, Any]], uuid.UUID | None, list[dict[str, Any]]]:
        rows, after = manage.list_messages(
            store, app.id, status=status, q=q or None, cursor=cursor, limit=PAGE_SIZE
        )
        return rows, after, routes.list_routes(store, app.id)

    rows, after, app_routes = await run_in_threadpool(load)
    return render(
        request,
        "inbound.html",
        {
            "rows": rows,
            "routes": app_routes,
            "q": q,
            "status": status or "",
            "statuses": INBOUND_STATUSES,
            "next_url": url("/inbound", viewer, q=q, status=status, cursor=after)
            if after
            else None,
        },
    )


@router.get("/inbound/{inbound_id}")
async def message_page(request: Request, viewer: SignedIn, inbound_id: uuid.UUID) -> Response:
    app = pick_app(viewer)
    try:
        message = await run_in_threadpool(manage.get_message, store_of(request), app.id, inbound_id)
    except routes.RouteError as exc:
        raise UiError(exc.status, exc.message) from None
    return render(request, "inbound_message.html", {"m": message})


@router.post("/inbound/{inbound_id}/{what}")
async def act(request: Request, viewer: CanChange, inbound_id: uuid.UUID, what: str) -> Response:
    app = pick_app(viewer)
    actions = {"release": manage.release, "replay": manage.replay}
    if what not in actions:
        raise UiError(404, "No such action.")
    store = store_of(request)
    back = url(f"/inbound/{inbound_id}", viewer)
    try:
        await run_in_threadpool(actions[what], store, app.id, inbound_id)
    except routes.RouteError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now, store, viewer, request, f"inbound.{what}", str(inbound_id), {"app": app.name}
    )
    done = "released to its route" if what == "release" else "queued to be handed off again"
    return redirect(request, back, f"The message is {done}.")


@router.post("/inbound-routes")
async def add_route(request: Request, viewer: CanChange) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    store = store_of(request)
    back = url("/inbound", viewer)
    try:
        route = await run_in_threadpool(
            routes.create_route,
            store,
            app.id,
            str(form.get("match") or ""),
            url=str(form.get("url") or "") or None,
            action=str(form.get("action") or "post"),
            format=str(form.get("format") or "native"),
            policy=DestinationPolicy.from_settings(request.app.state.settings),
        )
    except routes.RouteError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "route.create",
        f"{app.name}/{route['match']}",
        {"action": route["action"], "url": route["url"], "format": route["format"]},
    )
    return render(
        request,
        "secret_once.html",
        {
            "title": f"Route {route['match']} added",
            "intro": "Every hand-off of this route's mail is signed with this secret "
            "(Standard Webhooks).",
            "kept": "encrypted",
            "secrets": [("Signing secret", route["secret"])],
            "back": back,
        },
    )


@router.post("/inbound-routes/{route_id}/remove")
async def remove_route(request: Request, viewer: CanChange, route_id: int) -> Response:
    app = pick_app(viewer)
    store = store_of(request)
    back = url("/inbound", viewer)
    try:
        await run_in_threadpool(routes.delete_route, store, app.id, route_id)
    except routes.RouteError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now, store, viewer, request, "route.delete", f"{app.name}/{route_id}", {}
    )
    return redirect(request, back, "Route removed: its addresses are refused from now on.")
