"""Webhook payload formats: `native` (Standard Webhooks), `postmark`, `sendgrid`, `mailgun`.

Each format has a payload function `format(event_row, message_row) -> dict` (registered in
FORMATS), the event types it can report (EVENT_TYPES), and `render`, which turns one or more
events into the request an endpoint of that format receives: where to, headers, body."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from postbode.endpoints.signing import signed_headers
from postbode.events.types import EventType

from . import mailgun, native, postmark, sendgrid


class Format(Protocol):
    """Builds one webhook payload.

    `event` has the columns of `events` plus `app` (the app's name); `message` has the
    columns of `messages`, or is None for events about no message (e.g. `app.alert`)."""

    def __call__(
        self, event: Mapping[Any, Any], message: Mapping[Any, Any] | None
    ) -> dict[str, Any]: ...


FORMATS: dict[str, Format] = {
    "native": native.format,
    "postmark": postmark.format,
    "sendgrid": sendgrid.format,
    "mailgun": mailgun.format,
}
"""Every format an endpoint may choose, by name."""

EVENT_TYPES: dict[str, frozenset[str]] = {
    "native": frozenset(str(t) for t in EventType),
    "postmark": postmark.EVENT_TYPES,
    "sendgrid": sendgrid.EVENT_TYPES,
    "mailgun": mailgun.EVENT_TYPES,
}
"""The event types each format can report: an endpoint subscribes to these only."""

MAX_BATCH: dict[str, int] = {"native": 1, "postmark": 1, "sendgrid": 100, "mailgun": 1}
"""Events one request may carry: SendGrid's event webhook posts arrays, the others one."""


def get(name: str) -> Format:
    """The format called `name`; KeyError for an unknown one."""
    return FORMATS[name]


def max_batch(name: str) -> int:
    """How many events one request to an endpoint of this format may carry."""
    return MAX_BATCH[name]


def verification_key(name: str, secret: str) -> str | None:
    """What a receiver of this format verifies requests with, beyond the secret itself:
    SendGrid's public key (base64 DER) for `sendgrid`; None for the others."""
    return sendgrid.verification_key(secret) if name == "sendgrid" else None


@dataclass(frozen=True)
class Outgoing:
    """One webhook request as it goes out."""

    url: str  # the endpoint's URL, any user:password moved into an Authorization header
    headers: dict[str, str]
    body: bytes


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _credentials(url: str) -> tuple[str, dict[str, str]]:
    """(URL without user:password, the Basic Authorization header they make, if any):
    Postmark's way of securing webhooks is basic auth written into the URL."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, {}
    user, password = unquote(parts.username), unquote(parts.password or "")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=netloc)), {"authorization": f"Basic {token}"}


def render(
    hook: Mapping[Any, Any],
    items: Sequence[tuple[Mapping[Any, Any], Mapping[Any, Any] | None]],
    secrets: Sequence[str],
    now: datetime,
) -> Outgoing:
    """The request that carries `items` ((event row, message row or None), at most
    `max_batch(hook["format"])` of them, oldest first) to the endpoint `hook` (its `url` and
    `format`), signed with `secrets` (the endpoint's secrets in force, current first).

    Every request carries the Standard Webhooks headers (webhook-id is the first event's id);
    besides, `postmark` moves the URL's user:password into basic auth, `sendgrid` adds its
    ECDSA signature headers over the JSON array, and `mailgun` signs inside the body with the
    current secret as the signing key."""
    name = hook["format"]
    if not items:
        raise ValueError("no events to send")
    if len(items) > max_batch(name):
        raise ValueError(f"a {name} request carries at most {max_batch(name)} events")
    if not secrets:
        raise ValueError("no secret to sign with")
    fmt = get(name)
    timestamp = int(now.timestamp())
    payloads = [fmt(event, message) for event, message in items]
    if name == "sendgrid":
        body = _json(payloads)
    elif name == "mailgun":
        body = _json({"signature": mailgun.signature(secrets[0], timestamp), **payloads[0]})
    else:
        body = _json(payloads[0])
    url, auth = _credentials(hook["url"])
    headers = {
        "content-type": "application/json",
        **auth,
        **signed_headers(secrets, str(items[0][0]["id"]), body, timestamp),
    }
    if name == "sendgrid":
        headers.update(sendgrid.signed_headers(secrets[0], timestamp, body))
    return Outgoing(url, headers, body)
