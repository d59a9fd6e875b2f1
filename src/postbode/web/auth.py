"""Who is calling: API keys (Bearer) for the API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.web.errors import error_body


async def api_app_id(request: Request) -> int:
    """The app an `Authorization: Bearer <api key>` header belongs to; 401 otherwise."""
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
    return app_id


ApiApp = Annotated[int, Depends(api_app_id)]
