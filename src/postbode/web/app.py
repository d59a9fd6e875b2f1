"""The HTTP application: API, web UI, health and metrics, on one FastAPI app."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from postbode import __version__
from postbode.config import Settings
from postbode.metrics import update_queue_gauges
from postbode.store.engine import Store


def create_app(settings: Settings, store: Store) -> FastAPI:
    """The ASGI app serving Postbode's HTTP side from `store`."""
    app = FastAPI(
        title="Postbode",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        try:
            ok = await run_in_threadpool(store.ping)
        except Exception as exc:  # the store is down: say so, don't crash the probe
            return JSONResponse({"status": "error", "store": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok" if ok else "error", "version": __version__})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        await run_in_threadpool(update_queue_gauges, store)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app)
    return app


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one JSON error shape of the API: {"error": {"code", "message", "field"}}."""
    return {"error": {"code": code, "message": message, "field": field}}


def _install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = str(first.get("msg", "invalid request"))
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid"
        return JSONResponse(error_body(code, message, ".".join(loc) or None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            body = exc.detail
        else:
            body = error_body(_code_for(exc.status_code), str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _code_for(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        413: "too_large",
        429: "rate_limited",
    }.get(status, "error")
