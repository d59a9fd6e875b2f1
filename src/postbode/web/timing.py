"""The `Server-Timing` header: how long the server took before it answered, on every answer."""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServerTiming:
    """Adds `Server-Timing: app;dur=<ms>` (W3C Server Timing) to each HTTP answer: the time
    from the request's arrival to the answer's start. A page is rendered before its answer
    starts, so for the UI this is the time its queries and its template took; browsers show it
    in their developer tools, and the UI's browser test and benchmark read it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000
                headers: list[Any] = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)


def server_ms(header: str | None) -> float | None:
    """The `app` duration of a Server-Timing header value, in milliseconds."""
    for metric in (header or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        if name == "app":
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None
