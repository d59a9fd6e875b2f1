"""The one JSON error shape of the API, and the handlers that produce it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """{"error": {"code", "message", "field"}}."""
    return {"error": {"code": code, "message": message, "field": field}}


class ApiError(Exception):
    """Raise from an endpoint to answer with the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(code, message, field)


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


# Paths whose clients are programs: they always get the JSON error shape.
_API_PREFIXES = ("/api/", "/compat/", "/email", "/t/", "/healthz", "/metrics", "/static/")


def wants_page(request: Request) -> bool:
    """A browser asking for a page (not an API client, not a fetch of a static file)."""
    path = request.url.path
    if path.startswith(_API_PREFIXES) or request.headers.get("hx-request"):
        return False
    return "text/html" in request.headers.get("accept", "")


HtmlPage = Callable[[Request, int, str], Awaitable[Response]]


def install_error_handlers(app: FastAPI, page: HtmlPage | None = None) -> None:
    """The JSON error shape for every error; with `page`, a browser asking for a path that
    does not exist (or not with that method) gets the UI's styled page instead."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = str(first.get("msg", "invalid request"))
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid"
        return JSONResponse(error_body(code, message, ".".join(loc) or None), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if page is not None and exc.status_code in (404, 405) and wants_page(request):
            return await page(request, exc.status_code, str(exc.detail))
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            body = exc.detail
        else:
            body = error_body(_CODES.get(exc.status_code, "error"), str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)
