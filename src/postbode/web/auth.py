"""Who is calling: API keys (Bearer) for the API, checked before a request body is read."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.abuse.limits import credential_lookup
from postbode.web.errors import error_body

APP_ID_KEY = "postbode.api_app_id"  # where the request's scope keeps the authenticated app
CREDENTIAL_KEY = "postbode.api_credential"  # and the API key's lookup (its sending limits)


def note_credential(request: Request, key: str) -> None:
    """Keep which API key the request came with, for its sending limits (abuse/limits.py)."""
    request.scope[CREDENTIAL_KEY] = credential_lookup(key.strip())


async def api_app_id(request: Request) -> int:
    """The app an `Authorization: Bearer <api key>` header belongs to; 401 otherwise.
    Checked once per request (the answer is kept in the request's scope)."""
    known = request.scope.get(APP_ID_KEY)
    if isinstance(known, int):
        return known
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401,
            error_body("unauthorized", "missing API key: send Authorization: Bearer <key>"),
            headers={"WWW-Authenticate": "Bearer"},
        )
    app_id = await run_in_threadpool(
        tenancy.authenticate_api_key, request.app.state.store, key.strip()
    )
    if app_id is None:
        raise HTTPException(
            401,
            error_body("unauthorized", "invalid or revoked API key"),
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.scope[APP_ID_KEY] = app_id
    note_credential(request, key)
    return app_id


class AuthenticatedRoute(APIRoute):
    """An API route whose caller is authenticated before its body is read: FastAPI reads and
    parses a body before it solves dependencies, so without this a stranger's large body
    would be taken in full before the 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                await api_app_id(request)
            return await handler(request)

        return handle


ApiApp = Annotated[int, Depends(api_app_id)]
