"""The API reference at /api/docs: the vendored Swagger UI reading /api/openapi.json, served
from this host only (no CDN), under a Content-Security-Policy without inline scripts."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from postbode import __version__

# Swagger UI sets style attributes from its scripts; everything else comes from this host.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/api/docs")
async def api_docs(request: Request) -> HTMLResponse:
    openapi_url = escape(request.app.openapi_url or "/api/openapi.json")
    static = "/static/vendor/swagger-ui"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Postbode API {escape(__version__)}</title>
<link rel="icon" href="/static/favicon.svg">
<link rel="stylesheet" href="{static}/swagger-ui.css?v={escape(__version__)}">
</head>
<body data-openapi="{openapi_url}">
<div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js?v={escape(__version__)}"></script>
<script src="/static/js/api-docs.js?v={escape(__version__)}"></script>
</body>
</html>
"""
    return HTMLResponse(
        page,
        headers={
            "Content-Security-Policy": DOCS_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
