"""The Alerts page (the organisation's `app.alert`s and its held apps), holding and releasing
an app, and its sending limits and those of each of its credentials, from the UI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from postbode.abuse import alerts, hold, limits, release
from postbode.abuse.figures import app_figures
from postbode.web.ui.core import (
    CanChange,
    SignedIn,
    UiError,
    UiRoute,
    Viewer,
    audit,
    client_ip,
    redirect,
    render,
    safe_next,
    settings_of,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)

SHOWN = 200  # alerts listed on the page, newest first


@router.get("/alerts")
async def alerts_page(request: Request, viewer: SignedIn) -> Response:
    store = store_of(request)

    shown = [viewer.app] if viewer.app else viewer.apps
    settings = settings_of(request)

    def load() -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
        with store.read() as conn:
            rows = alerts.recent(
                conn,
                viewer.org_id,
                app_id=viewer.app.id if viewer.app else None,
                limit=SHOWN,
            )
            return rows, app_figures(conn, [a.id for a in shown], settings)

    rows, figures = await run_in_threadpool(load)
    held = [a for a in viewer.apps if a.hold_reason and (viewer.app in (None, a))]
    return render(
        request,
        "alerts.html",
        {
            "alerts": rows,
            "held": held,
            "kinds": alerts.KINDS,
            "figures": [(a, figures[a.id]) for a in shown],
        },
    )


def _actor(request: Request, viewer: Viewer) -> hold.Actor:
    return hold.Actor(viewer.email, user_id=viewer.user_id, ip=client_ip(request))


def _named(viewer: Viewer, name: str) -> int:
    found = viewer.app_named(name)
    if found is None:
        raise UiError(404, f"No app named {name!r} in {viewer.org_name}.")
    return found.id


@router.post("/settings/apps/{name}/hold")
async def hold_app(request: Request, viewer: CanChange, name: str) -> Response:
    app_id = _named(viewer, name)
    form = await request.form()
    reason = str(form.get("reason", "")).strip()[: hold.REASON_CHARS]
    back = safe_next(str(form.get("back", "")) or url("/alerts", viewer))
    if not reason:
        return redirect(request, back, "Give a reason for the hold.", "error")
    await run_in_threadpool(hold.hold, store_of(request), app_id, reason, _actor(request, viewer))
    return redirect(request, back, f"{name} is held: its new mail waits until released.")


@router.post("/settings/apps/{name}/release")
async def release_app(request: Request, viewer: CanChange, name: str) -> Response:
    app_id = _named(viewer, name)
    form = await request.form()
    back = safe_next(str(form.get("back", "")) or url("/alerts", viewer))
    released = await run_in_threadpool(
        release.release, store_of(request), app_id, _actor(request, viewer)
    )
    return redirect(request, back, f"{name} released: {released} held deliveries queued.")


def _limit_changes(form: Any) -> dict[str, int | None] | str:
    """per_minute, per_hour and per_day of a limits form (empty: no limit), or what is wrong."""
    changes: dict[str, int | None] = {}
    for field in ("per_minute", "per_hour", "per_day"):
        text = str(form.get(field, "")).strip()
        if not text:
            changes[field] = None
        elif text.isdigit() and int(text) <= limits.MAX_LIMIT:
            changes[field] = int(text)
        else:
            return f"{field}: a number of messages, or empty."
    return changes


@router.post("/settings/apps/{name}/limits")
async def save_limits(request: Request, viewer: CanChange, name: str) -> Response:
    return await _save_limits(request, viewer, name, None)


@router.post("/settings/apps/{name}/credentials/{credential_id}/limits")
async def save_credential_limits(
    request: Request, viewer: CanChange, name: str, credential_id: int
) -> Response:
    """One API key's or SMTP login's own limits, audited as the CLI and the management API
    audit them (`app.limits` on "<app> credential <id>")."""
    return await _save_limits(request, viewer, name, credential_id)


async def _save_limits(
    request: Request, viewer: Viewer, name: str, credential_id: int | None
) -> Response:
    app_id = _named(viewer, name)
    form = await request.form()
    back = url(f"/settings/apps/{name}", viewer)
    changes = _limit_changes(form)
    if isinstance(changes, str):
        return redirect(request, back, changes, "error")
    store = store_of(request)
    target = name if credential_id is None else f"{name} credential {credential_id}"

    def run() -> None:
        with store.write() as conn:
            if credential_id is not None:
                limits.get_limits(conn, app_id, credential_id)  # LookupError: not this app's
            after = limits.set_limits(conn, app_id, changes, credential_id)
            audit(conn, viewer, request, "app.limits", target, after.as_json())

    try:
        await run_in_threadpool(run)
    except LookupError:
        raise UiError(404, f"No credential {credential_id} in {name}.") from None
    saved = (
        "Sending limits"
        if credential_id is None
        else f"Sending limits of credential {credential_id}"
    )
    return redirect(request, back, f"{saved} saved.")
