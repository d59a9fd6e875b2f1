"""What the compatible APIs share: reading a capped body, the caller's key, and handing a
translated request to the native API's front door with its errors in one neutral shape."""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.ingest.accept import Accepted
from postbode.web.api.messages import (
    SendRequest,
    accept_send_request,
    body_limit,
    describe_validation_error,
)
from postbode.web.auth import note_credential
from postbode.web.errors import ApiError


@dataclass
class Refusal(Exception):
    """A request Postbode refuses, in the native vocabulary (`code`, `message`, `field` as
    the native API names them); each compatible API renders it in its provider's shape."""

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after: int | None = None  # seconds, for a 429 (a sending limit): Retry-After

    def __str__(self) -> str:
        return self.message


def retry_headers(retry_after: int | None) -> dict[str, str] | None:
    """Retry-After for an answer that says when to come back (RFC 9110 §10.2.3)."""
    return {"Retry-After": str(retry_after)} if retry_after is not None else None


class TooLarge(Exception):
    """The request body is larger than the API reads."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


async def read_body(request: Request) -> bytes:
    """The request body, read only up to the native API's cap (TooLarge beyond): the
    compatible APIs bound memory before they parse, as the native one does."""
    limit = body_limit(request.app.state.settings)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def app_for_key(request: Request, key: str) -> int | None:
    """The app an API key belongs to (the native API's keys), or None."""
    key = key.strip()
    if not key:
        return None
    note_credential(request, key)
    cached = tenancy.recently_authenticated(key)
    if cached is not None:
        return cached
    store = request.app.state.store
    return await run_in_threadpool(tenancy.authenticate_api_key, store, key)


def mailbox(address: str, name: str | None = None) -> str:
    """`Name <addr>` (the display name quoted when it needs to be) for the native API."""
    if not name:
        return address
    # Quoted as RFC 5322 §3.2.4 quoted-string (the native parser takes it back); not
    # email.utils.formataddr, which refuses a non-ASCII address.
    return f'"{email.utils.quote(name)}" <{address}>'


def split_addresses(value: str | None) -> list[str]:
    """A provider's comma-separated address list (`a@x, "B, C" <b@y>`) as single mailboxes;
    a fragment that is no address is kept as given, for validation to name it."""
    if not value or not value.strip():
        return []
    found = []
    for name, address in email.utils.getaddresses([value]):
        if address or name:
            found.append(mailbox(address, name) if address else name)
    return found


def validate(body: Mapping[str, Any]) -> SendRequest:
    """The native send request of a translated body; Refusal naming the native field."""
    try:
        return SendRequest.model_validate(dict(body))
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
        code, message, field = describe_validation_error(errors)
        raise Refusal(422, code, message, field) from None


async def accept(request: Request, app_id: int, body: SendRequest) -> Accepted:
    """Hand the request to the front door (postbode.ingest.accept, through the native API's
    own builder); Refusal for anything it refuses."""
    try:
        return await accept_send_request(request, app_id, body)
    except ApiError as exc:
        error = exc.body["error"]
        raise Refusal(exc.status, error["code"], error["message"], error["field"]) from None
    except HTTPException as exc:
        detail = exc.detail
        if isinstance(detail, dict) and "error" in detail:
            error = detail["error"]
            retry = (exc.headers or {}).get("Retry-After", "")
            raise Refusal(
                exc.status_code,
                error["code"],
                error["message"],
                error["field"],
                int(retry) if retry.isdigit() else None,
            ) from None
        raise Refusal(exc.status_code, "error", str(detail)) from None


def native_field(field: str | None) -> tuple[str, int | None, str]:
    """(top-level field, list index or None, the rest) of a native field path like `to.1`
    or `attachments.0.content`."""
    if not field:
        return "", None, ""
    head, _, rest = field.partition(".")
    index_text, _, tail = rest.partition(".")
    if index_text.isdigit():
        return head, int(index_text), tail
    return head, None, rest


def suppressed(accepted: Accepted) -> list[str]:
    """The recipients the front door did not queue because they are suppressed."""
    return [r.email for r in accepted.recipients if r.status == "suppressed"]
