"""The web UI: server-rendered pages (Jinja2, htmx, Chart.js) on the HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent.parent / "static"


def _router() -> APIRouter:
    from postbode.web.ui import (
        alerts,
        audit,
        dashboard,
        inbound,
        messages,
        privacy,
        queue,
        reports,
        session,
        settings,
        suppressions,
        templates,
        users,
    )

    combined = APIRouter(include_in_schema=False)
    modules = (
        session,
        dashboard,
        messages,
        queue,
        suppressions,
        inbound,
        templates,
        settings,
        users,
        audit,
        privacy,
        alerts,
        reports,
    )
    for module in modules:
        combined.include_router(module.router)
    return combined


class _Static(StaticFiles):
    """Static files with the UI's headers: no sniffing, cacheable (URLs carry the version)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"public, max-age=86400"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def static_files() -> StaticFiles:
    """The app for /static: vendored htmx and Chart.js, our CSS and scripts."""
    return _Static(directory=STATIC)


router = _router()
