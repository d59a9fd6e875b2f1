"""What any HTTP request may carry, enforced at the ASGI level before a route sees it: a body
no larger than its path's limit (while it streams in, Content-Length or chunked), and no NUL
character in the path or query (no text column of PostgreSQL holds one)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from postbode.web.errors import error_body


def too_large(limit: int) -> HTTPException:
    """The 413 in the API's error shape (routes and the exception handlers answer it)."""
    return HTTPException(
        413, error_body("too_large", f"the request body is larger than {limit} bytes")
    )


class BodyLimit:
    """ASGI middleware: no route reads more of a request body than its path's limit.

    The first read of a body whose Content-Length is over the limit raises the 413 at once,
    without taking a byte; a body that streams past the limit (chunked, or longer than it
    said) makes the read that crosses it raise the 413. Nothing is read before a route asks,
    so a route that authenticates first (web.auth) answers a stranger 401 without reading.
    Paths in `limits` have their own (the send API, file uploads; a key ending in `*` covers
    every path it starts); others have `default`."""

    def __init__(self, app: ASGIApp, default: int, limits: Mapping[str, int]) -> None:
        self.app = app
        self.default = default
        self.limits = dict(limits)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await _answer(send, 422, "invalid", "the URL must not contain NUL characters")
            return
        limit = self._limit(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        seen = int(declared) if declared.isdigit() and int(declared) > limit else 0
        has_body = declared not in (b"", b"0") or b"transfer-encoding" in headers
        finished = not has_body

        async def capped() -> Message:
            nonlocal seen, finished
            if seen > limit:
                raise too_large(limit)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                finished = not message.get("more_body", False)
                if seen > limit:
                    raise too_large(limit)
            return message

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not finished:
                # Answered before the body was read (401, 413): close the connection after
                # the answer instead of reading the rest of the body only to discard it.
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, capped, closing)

    def _limit(self, path: str) -> int:
        """The path's own limit: an exact key, else the longest `prefix*` key it starts with."""
        if path in self.limits:
            return self.limits[path]
        found = [k for k in self.limits if k.endswith("*") and path.startswith(k[:-1])]
        return self.limits[max(found, key=len)] if found else self.default


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
