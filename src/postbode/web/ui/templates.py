"""The Templates page: the app's templates with their versions, an editor, a preview with a
test model (HTML in a sandboxed frame, text, subject, errors with their line), and the A/B
test pages with their running figures and verdict."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from postbode.stats import queries
from postbode.templates import abtest, manage
from postbode.templates.send import parse_model
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
from postbode.web.ui.messages import PREVIEW_CSP

router = APIRouter(route_class=UiRoute, include_in_schema=False)

MAX_MODEL_CHARS = 20_000  # a test model in a URL


def _model_text(request: Request) -> str:
    text = str(request.query_params.get("model") or "{}")
    if len(text) > MAX_MODEL_CHARS:
        raise UiError(400, f"A test model is at most {MAX_MODEL_CHARS} characters here.")
    return text


def _preview(store: Any, app_id: int, alias: str, model_text: str) -> dict[str, Any]:
    """The live version rendered for the test model, as a send would render it."""
    try:
        model = parse_model(model_text)
    except manage.TemplateError as exc:
        error = {"part": "model", "line": None, "message": exc.message}
        return {"valid": False, "errors": [error], "rendered": None}
    return {"rendered": None, **manage.validate(store, app_id, alias=alias, model=model)}


@router.get("/templates")
async def templates_page(request: Request, viewer: SignedIn) -> Response:
    app = pick_app(viewer)
    store = store_of(request)

    def load() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = manage.list_templates(store, app.id)
        # The last 30 days of each (what GET /api/v1/stats?template= gives), in one scan.
        found = {t.tag: t for t in queries.template_stats(store, [app.id], "30d")}
        quiet = {"sent": 0, "rates": queries.rates({}, {}).__dict__}
        for row in rows:
            t = found.get(row["alias"])
            row["stats"] = t.counts_json() if t is not None else quiet
        return rows, abtest.list_tests(store, app.id)

    rows, tests = await run_in_threadpool(load)
    return render(request, "templates.html", {"rows": rows, "tests": tests})


@router.post("/templates")
async def create_template(request: Request, viewer: CanChange) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    store = store_of(request)
    alias = str(form.get("alias") or "").strip()
    try:
        await run_in_threadpool(
            manage.create_template,
            store,
            app.id,
            alias,
            subject=str(form.get("subject") or ""),
            html=str(form.get("html") or "") or None,
            text=str(form.get("text") or "") or None,
            layout=str(form.get("layout") or "").strip() or None,
            name=str(form.get("name") or ""),
        )
    except manage.TemplateError as exc:
        return redirect(request, url("/templates", viewer), exc.message, "error")
    await run_in_threadpool(
        audit_now, store, viewer, request, "template.create", f"{app.name}/{alias}", {}
    )
    return redirect(request, url(f"/templates/{alias}", viewer), "Template created.")


@router.get("/templates/{alias}")
async def template_page(request: Request, viewer: SignedIn, alias: str) -> Response:
    app = pick_app(viewer)
    store = store_of(request)
    model_text = _model_text(request)

    def load() -> tuple[dict[str, Any], dict[str, Any]]:
        return manage.get_template(store, app.id, alias), _preview(store, app.id, alias, model_text)

    try:
        template, preview = await run_in_threadpool(load)
    except manage.TemplateError as exc:
        raise UiError(exc.status, exc.message) from None
    return render(
        request,
        "template.html",
        {"t": template, "preview": preview, "model": model_text},
    )


@router.get("/templates/{alias}/preview")
async def template_preview(request: Request, viewer: SignedIn, alias: str) -> Response:
    """The rendered HTML, for the page's sandboxed iframe (no scripts, no same-origin)."""
    app = pick_app(viewer)
    model_text = _model_text(request)
    try:
        preview = await run_in_threadpool(_preview, store_of(request), app.id, alias, model_text)
    except manage.TemplateError as exc:
        raise UiError(exc.status, exc.message) from None
    html = (preview.get("rendered") or {}).get("html")
    body = html if html is not None else "<p>No HTML: see the errors or the text part.</p>"
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": PREVIEW_CSP.format(remote=""),
            "X-Frame-Options": "SAMEORIGIN",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.post("/templates/{alias}")
async def save_version(request: Request, viewer: CanChange, alias: str) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    store = store_of(request)
    back = url(f"/templates/{alias}", viewer)
    live = form.get("live") == "on"
    try:
        saved = await run_in_threadpool(
            manage.update_template,
            store,
            app.id,
            alias,
            subject=str(form.get("subject") or ""),
            html=str(form.get("html") or "") or None,
            text=str(form.get("text") or "") or None,
            layout=str(form.get("layout") or "").strip() or None,
            live=live,
        )
    except manage.TemplateError as exc:
        return redirect(request, back, exc.message, "error")
    version = saved["latest_version"]
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "template.version",
        f"{app.name}/{alias}",
        {"version": version, "live": live},
    )
    done = "and made live" if live else "(not live: choose it below)"
    return redirect(request, back, f"Version {version} saved {done}.")


@router.post("/templates/{alias}/live")
async def make_live(request: Request, viewer: CanChange, alias: str) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    store = store_of(request)
    back = url(f"/templates/{alias}", viewer)
    try:
        version = int(str(form.get("version") or "0"))
        await run_in_threadpool(manage.set_live, store, app.id, alias, version)
    except ValueError:
        return redirect(request, back, "Choose a version.", "error")
    except manage.TemplateError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "template.live",
        f"{app.name}/{alias}",
        {"version": version},
    )
    return redirect(request, back, f"Version {version} is live.")


@router.get("/ab-tests/{test_id}")
async def test_page(request: Request, viewer: SignedIn, test_id: int) -> Response:
    app = pick_app(viewer)
    if not 1 <= test_id < 2**31:
        raise UiError(404, "No such A/B test.")
    try:
        test = await run_in_threadpool(abtest.get_test, store_of(request), app.id, test_id)
    except manage.TemplateError as exc:
        raise UiError(exc.status, exc.message) from None
    return render(request, "ab_test.html", {"test": test})


@router.post("/ab-tests/{test_id}/end")
async def end_test(request: Request, viewer: CanChange, test_id: int) -> Response:
    app = pick_app(viewer)
    form = await request.form()
    store = store_of(request)
    back = url(f"/ab-tests/{test_id}", viewer)
    winner = str(form.get("winner") or "") or None
    try:
        ended = await run_in_threadpool(abtest.end_test, store, app.id, test_id, winner)
    except manage.TemplateError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "ab_test.end",
        f"{app.name}/{test_id}",
        {"winner": ended["winner"]},
    )
    return redirect(request, back, f"Ended: {ended['winner']} is live.")
