"""The native HTTP send API: POST, read and list messages under /api/v1/messages."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import inspect
import json
import mimetypes
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message as MimeHeaders
from typing import Annotated, Any, Literal
from uuid import UUID

import fastapi
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import Connection, and_, case, func, select, true
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from postbode import tenancy
from postbode.bounces.classify import CATEGORIES
from postbode.config import Settings
from postbode.ingest import mime
from postbode.ingest.accept import (
    Accepted,
    AcceptError,
    Acceptor,
    RateLimited,
    Submission,
    TemporaryAcceptError,
    normalise_address,
    parse_send_at,
    request_hash,
)
from postbode.store.engine import Store
from postbode.store.schema import DeliveryStatus, attempts, deliveries, events, messages
from postbode.templates.manage import TemplateError
from postbode.templates.send import TemplateCache
from postbode.web.api.fields import Instant
from postbode.web.api.templates import api_error as template_api_error
from postbode.web.auth import CREDENTIAL_KEY, api_app_id, note_credential
from postbode.web.errors import ApiError, error_body

MAX_LIST_ENTRIES = 1000  # to/cc/bcc entries parsed at most; smtp_max_recipients is the real cap
MAX_HEADERS = 50
MAX_ATTACHMENTS = 100
MAX_FILENAME = 255
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1000
MAX_METADATA_SIZE = 4096  # characters of all keys and values together
RETRY_AFTER_SECONDS = 5
PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# The reply and MX filters have no index: a page looks at most this many messages (newest
# first from its cursor), as the UI's log does, and one that is not full by then still has a
# next_cursor, from where it stopped.
SCAN_WINDOW = 5_000
# Deliveries that will be attempted again show when; for the others next_attempt_at is stale.
_PENDING = ("scheduled", "queued", "deferred", "sending")
_MIME_TYPES = mimetypes.MimeTypes()  # the built-in table only: the same guess on every machine

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def body_limit(settings: Settings) -> int:
    """The largest request body read: twice the largest message (room for base64 and JSON
    escapes) and 1 MiB; a larger body is refused with 413 before it is read."""
    return 2 * settings.smtp_max_message_size + 1024 * 1024


# -- validation -----------------------------------------------------------------------------------


def _text(value: str) -> str:
    # PostgreSQL text and JSON hold no NUL; lone surrogates (JSON "\ud800") are no Unicode.
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "must be valid Unicode text") from None
    return value


def _line(value: str) -> str:
    _text(value)
    try:
        return mime.check_line(value)
    except mime.MimeError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None


def _mailbox(value: object) -> mime.Mailbox:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    _text(value)
    try:
        return mime.parse_mailbox(value)
    except mime.MimeError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None


def _base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a base64 string")
    # Line breaks as MIME writes them are fine; anything else outside the alphabet, or padding
    # out of place, is not (binascii forgives surplus padding even in strict mode).
    data = "".join(value.split())
    try:
        if len(data) % 4 or not _BASE64.fullmatch(data):
            raise binascii.Error
        return binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except binascii.Error:
        raise PydanticCustomError("invalid_base64", "not valid base64 (RFC 4648 §4)") from None


def _header_name(name: str) -> str:
    try:
        mime.check_header(name, "")
    except mime.MimeError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None
    return name


def _header_value(value: str) -> str:
    _line(value)
    if len(value) > mime.MAX_HEADER_VALUE:
        raise PydanticCustomError(
            "header_too_long", f"a header value is at most {mime.MAX_HEADER_VALUE} characters"
        )
    return value


def _content_type(value: str) -> str:
    try:
        mime.parse_content_type(value)
    except mime.MimeError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None
    return value


AddressField = Annotated[
    mime.Mailbox,
    PlainValidator(_mailbox),
    WithJsonSchema({"type": "string", "examples": ["Alice <alice@example.com>"]}),
]
Line = Annotated[str, AfterValidator(_line)]
Body = Annotated[str, AfterValidator(_text)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
MetadataKey = Annotated[
    str, StringConstraints(pattern=rf"^[A-Za-z0-9_.\-]{{1,{MAX_METADATA_KEY}}}$")
]
MetadataValue = Annotated[
    str, StringConstraints(max_length=MAX_METADATA_VALUE), AfterValidator(_text)
]
Base64Content = Annotated[
    bytes,
    PlainValidator(_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


class AttachmentIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    filename: Annotated[Line, StringConstraints(min_length=1, max_length=MAX_FILENAME)]
    content_type: Annotated[str, AfterValidator(_content_type)] | None = Field(
        None, description="`type/subtype`, parameters allowed; guessed from the filename if absent"
    )
    content: Base64Content
    content_id: Annotated[Line, StringConstraints(min_length=1, max_length=250)] | None = Field(
        None,
        description="Makes the attachment an inline part (`Content-Disposition: inline`) that "
        "HTML refers to as `cid:<content_id>`",
    )


class SendRequest(BaseModel):
    """A message to send. Headers the API builds or Postbode owns cannot be set in `headers`:
    From, To, Cc, Bcc, Reply-To, Subject, Sender, Date, Message-ID, MIME-Version, Content-*,
    trace fields (Received, Return-Path …), DKIM/ARC signatures, Resent-* and X-Postbode-*."""

    model_config = ConfigDict(strict=True, extra="forbid")

    from_: AddressField = Field(alias="from")
    to: Annotated[list[AddressField], Field(max_length=MAX_LIST_ENTRIES)] | None = None
    cc: Annotated[list[AddressField], Field(max_length=MAX_LIST_ENTRIES)] | None = None
    bcc: Annotated[list[AddressField], Field(max_length=MAX_LIST_ENTRIES)] | None = Field(
        None, description="Receive the message without being shown in it"
    )
    reply_to: AddressField | None = None
    subject: Annotated[Line, StringConstraints(min_length=1, max_length=998)] | None = Field(
        None, description="Required unless `template` gives it"
    )
    text: Body | None = None
    html: Body | None = None
    headers: Annotated[dict[HeaderName, HeaderValue], Field(max_length=MAX_HEADERS)] | None = Field(
        None, description="Extra header fields (one line each; reserved names refused)"
    )
    attachments: Annotated[list[AttachmentIn], Field(max_length=MAX_ATTACHMENTS)] | None = None
    tag: Annotated[Line, StringConstraints(min_length=1, max_length=100)] | None = None
    metadata: (
        Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)] | None
    ) = None
    stream: Literal["transactional", "broadcast"] = "transactional"
    track_opens: bool | None = Field(None, description="Absent: the app's setting")
    track_clicks: bool | None = Field(None, description="Absent: the app's setting")
    template: Annotated[Line, StringConstraints(min_length=1, max_length=100)] | None = Field(
        None,
        description="The alias of a template of the app: its live version makes the subject, "
        "html and text (which are then not given)",
    )
    model: Annotated[dict[str, Any], Field(max_length=1000)] | None = Field(
        None, description="The values the template renders (a JSON object)"
    )
    send_at: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="RFC 3339 time up to 30 days ahead: the deliveries wait as `scheduled` "
        "until then",
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and sum(len(k) + len(v) for k, v in value.items()) > MAX_METADATA_SIZE:
            raise PydanticCustomError(
                "metadata_too_large", f"metadata is at most {MAX_METADATA_SIZE} characters"
            )
        return value


# -- responses ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RecipientOut(BaseModel):
    email: str
    delivery_id: UUID
    status: str
    last_reply: str | None = Field(None, description="The remote's last reply, in the log")
    bounce_category: str | None = Field(None, description="In the message log")
    mx: str | None = Field(None, description="The MX host last tried, in the message log")
    matched: bool = Field(
        True, description="In the message log: this delivery matches every delivery filter"
    )


class SendResponse(BaseModel):
    id: UUID
    message_id: str = Field(description="The Message-ID header")
    recipients: list[RecipientOut]


class DeliveryOut(BaseModel):
    email: str
    delivery_id: UUID
    status: str
    attempts: int
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="Only while another attempt is due")
    mx: str | None
    last_reply: str | None
    bounce_category: str | None
    bounce_status: str | None
    hard: bool | None


class AttemptOut(BaseModel):
    id: UUID
    delivery_id: UUID
    recipient: str
    started_at: datetime
    duration_ms: int
    outcome: str
    mx_host: str | None
    ip: str | None
    port: int | None
    tls_version: str | None
    tls_cipher: str | None
    reply_code: int | None
    enhanced_status: str | None
    reply_text: str | None
    transcript: str


class EventOut(BaseModel):
    id: UUID
    type: str
    at: datetime
    delivery_id: UUID | None
    recipient: str | None
    data: dict[str, Any]


class _MessageBase(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: UUID
    message_id: str = Field(description="The Message-ID header")
    from_: str = Field(alias="from", description="The From header")
    mail_from: str
    subject: str
    tag: str | None
    metadata: dict[str, str]
    stream: str
    source: str
    received_at: datetime
    size: int


class MessageSummary(_MessageBase):
    recipients: list[RecipientOut]


class ContentSymbol(BaseModel):
    name: str = Field(description="rspamd's symbol, e.g. `GTUBE`, `R_SUSPICIOUS_URL`")
    score: float
    options: list[str] = Field(description="What the symbol matched (addresses, URLs …)")


class ContentScore(BaseModel):
    score: float = Field(description="rspamd's score for the message as accepted")
    symbols: list[ContentSymbol] = Field(description="Highest score first")


class MessageDetail(_MessageBase):
    track_opens: bool
    track_clicks: bool
    content: ContentScore | None = Field(
        None,
        description="rspamd's verdict when a content scanner is configured "
        "(`POSTBODE_RSPAMD_URL`); null when the message was not scanned",
    )
    recipients: list[DeliveryOut]
    attempts: list[AttemptOut] = Field(description="Oldest first")
    events: list[EventOut] = Field(description="Oldest first")


class MessageList(BaseModel):
    data: list[MessageSummary] = Field(description="Newest first")
    next_cursor: UUID | None = Field(description="Pass as `cursor` for the next page")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


# -- requests: capped bodies, errors that name the field ------------------------------------------


class _CappedRequest(Request):
    """A request whose body is read only up to `body_limit` (413 beyond)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit = body_limit(self.app.state.settings)
            length = self.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise _too_large(limit)
            chunks: list[bytes] = []
            size = 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        413, error_body("too_large", f"the request body is larger than {limit} bytes")
    )


_CODES = {"missing": "missing", "json_invalid": "invalid_json", "extra_forbidden": "unknown_field"}
_LOCATIONS = ("body", "query", "path", "header")
# Error types of our own validators are the codes; other validation errors are `invalid`.
_OWN_CODES = frozenset(
    {
        "nul_character",
        "invalid_unicode",
        "invalid_address",
        "invalid_base64",
        "invalid_header_name",
        "invalid_content_type",
        "header_injection",
        "header_too_long",
        "control_character",
        "reserved_header",
        "metadata_too_large",
    }
)


def validation_error(errors: Sequence[Any]) -> JSONResponse:
    """The first validation error as the JSON error shape, naming the field like `to.1`,
    `attachments.0.content` or `headers.X-Foo`."""
    code, message, field = describe_validation_error(errors)
    return JSONResponse(error_body(code, message, field), status_code=422)


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str, str | None]:
    """(code, message, field) of the first validation error, as `validation_error` answers it
    (the compatible APIs translate these into their provider's error shape)."""
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    kind = str(first.get("type", ""))
    loc = tuple(first.get("loc", ()))
    where = loc[0] if loc else None
    parts = [str(p) for p in loc[1:] if p != "[key]"] if where in _LOCATIONS else []
    message = str(first.get("msg", "invalid request"))
    if kind == "json_invalid":
        parts = []  # the location is a character offset, not a field
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
    elif where == "body" and not parts and isinstance(first.get("input"), bytes):
        message = "send a JSON object with Content-Type: application/json"
    elif kind == "missing":
        message = "this field is required"
    if kind in _CODES:
        code = _CODES[kind]
    elif kind in _OWN_CODES:
        code = kind
    else:
        code = "invalid"
    return code, message, ".".join(parts) or None


class _ApiRoute(APIRoute):
    """Routes of this API: request bodies capped, validation errors naming their field."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            capped = _CappedRequest(request.scope, request.receive)
            if self.body_field is not None:
                # FastAPI reads and parses the body before it solves dependencies: without a
                # key, answer 401 before taking tens of megabytes from a stranger.
                request.scope[_APP_ID] = await caller_app_id(capped)
            try:
                return await handler(capped)
            except RequestValidationError as exc:
                return validation_error(exc.errors())

        return handle


_APP_ID = "postbode.api_app_id"


async def caller_app_id(request: Request) -> int:
    """`api_app_id`, without a thread hop for a key this process checked lately (the check
    itself is a hash and a dict look-up; only a key not seen lately reads the store)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        cached = tenancy.recently_authenticated(key.strip())
        if cached is not None:
            note_credential(request, key)
            return cached
    return await api_app_id(request)


async def _caller(request: Request) -> int:
    """The calling app: authenticated once per request, before the body is read."""
    app_id = request.scope.get(_APP_ID)
    return app_id if isinstance(app_id, int) else await caller_app_id(request)


Caller = Annotated[int, Depends(_caller)]

router = APIRouter(
    prefix="/api/v1",
    tags=["messages"],
    route_class=_ApiRoute,
    responses=_errors(401, 422),
)


# -- POST /messages -------------------------------------------------------------------------------


def _recipients(body: SendRequest, max_recipients: int) -> list[str]:
    """Envelope recipients: to + cc + bcc; ApiError when there are none or too many."""
    found: list[str] = []
    for name, entries in (("to", body.to), ("cc", body.cc), ("bcc", body.bcc)):
        found.extend(m.address for m in entries or ())
        if len(found) > max_recipients:
            raise ApiError(
                422,
                "too_many_recipients",
                f"at most {max_recipients} recipients (to, cc and bcc together)",
                name,
            )
    if not found:
        raise ApiError(422, "missing", "give at least one recipient in to, cc or bcc", "to")
    return found


def _attachment(att: AttachmentIn) -> mime.Attachment:
    content_type = att.content_type or _MIME_TYPES.guess_type(att.filename)[0] or ""
    try:
        maintype, subtype, params = mime.parse_content_type(content_type)
    except mime.MimeError:  # a guess we cannot attach as such (message/rfc822 for .eml)
        maintype, subtype, params = "application", "octet-stream", {}
    content_id = att.content_id.strip("<>") if att.content_id else None
    return mime.Attachment(att.filename, maintype, subtype, att.content, params, content_id)


def draft(body: SendRequest, max_size: int) -> mime.Draft:
    """The message content of a request; ApiError for what no single field shows."""
    if body.subject is None:
        raise ApiError(422, "missing", "give a subject (or a template)", "subject")
    if body.text is None and body.html is None:
        raise ApiError(422, "missing", "give text or html (or both)", "text")
    attachments = body.attachments or []
    total = 0
    for i, att in enumerate(attachments):
        size = mime.base64_size(len(att.content))
        total += size
        if size > max_size:
            raise ApiError(
                422,
                "too_large",
                f"the attachment is {size} bytes encoded; a message is at most {max_size}",
                f"attachments.{i}.content",
            )
    if total > max_size:
        raise ApiError(
            422,
            "too_large",
            f"the attachments are {total} bytes encoded; a message is at most {max_size}",
            "attachments",
        )
    return mime.Draft(
        sender=body.from_,
        subject=body.subject,
        to=body.to or [],
        cc=body.cc or [],
        reply_to=body.reply_to,
        text=body.text,
        html=body.html,
        headers=list((body.headers or {}).items()),
        attachments=[_attachment(a) for a in attachments],
    )


def build(body: SendRequest, max_size: int) -> bytes:
    """The RFC 5322 message of a request, at most `max_size` bytes; raises ApiError."""
    content = draft(body, max_size)
    try:
        raw = mime.build(content)
    except mime.MimeError as exc:
        raise ApiError(422, exc.code, exc.message) from None
    if len(raw) > max_size:
        if body.attachments:
            field = "attachments"
        else:
            field = "html" if len(body.html or "") > len(body.text or "") else "text"
        raise ApiError(
            422, "too_large", f"the message is {len(raw)} bytes; at most {max_size}", field
        )
    return raw


def _canonical(data: Any) -> bytes:
    """The request body as the Idempotency-Key fingerprint sees it: key order and white
    space do not make two requests different."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


# Requests whose content is at most this many characters are built on the event loop: the
# build is CPU under the GIL either way, and a thread hop costs more than a small build.
INLINE_BUILD_CHARS = 64 * 1024

# RFC 9110 §5.5 field value, as printable ASCII; the FastAPI route and the fast path both check it.
IDEMPOTENCY_KEY_MIN, IDEMPOTENCY_KEY_MAX = 1, 255
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]+$"


def _content_chars(body: SendRequest) -> int:
    return (
        len(body.text or "")
        + len(body.html or "")
        + sum(len(a.content) for a in body.attachments or ())
    )


async def accept_send_request(request: Request, app_id: int, body: SendRequest) -> Accepted:
    """Build, store and answer one validated send request (no Idempotency-Key): what the
    compatible APIs hand over after translating their provider's fields. Raises ApiError or
    HTTPException with the JSON error shape."""
    return await _accept(request, app_id, body, None, None)


def with_template(
    body: SendRequest, cache: TemplateCache, recipient: str
) -> tuple[SendRequest, dict[str, Any]]:
    """`body` with subject, html and text rendered from its template for its model, and the
    Submission fields that record the template. Raises ApiError naming the field."""
    if body.template is None:
        if body.model is not None:
            raise ApiError(422, "invalid", "a model is given with a template", "model")
        return body, {}
    for name in ("subject", "html", "text"):
        if getattr(body, name) is not None:
            raise ApiError(422, "invalid", f"{name} comes from the template: leave it out", name)
    try:
        made = cache.make(body.template, dict(body.model or {}), recipient)
    except TemplateError as exc:
        raise template_api_error(exc) from None
    try:
        _line(made.rendered.subject)
    except PydanticCustomError as exc:
        raise ApiError(422, "template_render", f"the subject {exc.message()}", "model") from None
    rendered = body.model_copy(
        update={
            "subject": made.rendered.subject[:998] or "(no subject)",
            "html": made.rendered.html,
            "text": made.rendered.text,
        }
    )
    return rendered, {
        "template": made.template,
        "template_version": made.version,
        "ab_test_id": made.ab_test_id,
        "ab_variant": made.ab_variant,
    }


def send_at_of(body: SendRequest) -> datetime | None:
    if body.send_at is None:
        return None
    try:
        return parse_send_at(body.send_at, datetime.now(UTC))
    except AcceptError as exc:
        raise ApiError(422, exc.reason, exc.message, exc.field) from None


async def _accept(
    request: Request,
    app_id: int,
    body: SendRequest,
    idempotency_key: str | None,
    data: Any,
) -> Accepted:
    """Build, store and answer one send request, `data` being its JSON as parsed (the
    Idempotency-Key fingerprint): the one implementation behind the FastAPI route and the
    fast path. Raises ApiError or HTTPException with the JSON error shape."""
    settings: Settings = request.app.state.settings
    acceptor: Acceptor = request.app.state.acceptor
    recipients = _recipients(body, settings.smtp_max_recipients)
    send_at = send_at_of(body)
    made: dict[str, Any] = {}
    if body.template is not None or body.model is not None:
        cache = TemplateCache(request.app.state.store, app_id)
        body, made = await run_in_threadpool(with_template, body, cache, recipients[0])
    if _content_chars(body) <= INLINE_BUILD_CHARS:
        raw = build(body, settings.smtp_max_message_size)
    else:
        raw = await run_in_threadpool(build, body, settings.smtp_max_message_size)
    client = request.scope.get("client")
    submission = Submission(
        app_id=app_id,
        source="api",
        mail_from=body.from_.address,
        recipients=recipients,
        raw=raw,
        stream=body.stream,
        tag=body.tag,
        metadata=dict(body.metadata or {}),
        track_opens=body.track_opens,
        track_clicks=body.track_clicks,
        client_ip=client[0] if client else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash(_canonical(data)) if idempotency_key else None,
        send_at=send_at,
        credential=request.scope.get(CREDENTIAL_KEY),
        **made,
    )
    try:
        return await acceptor.accept(submission)
    except RateLimited as exc:
        raise HTTPException(
            429,
            error_body(exc.reason, exc.message, exc.field),
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except AcceptError as exc:  # IdempotencyConflict (409) among them
        raise ApiError(exc.status, exc.reason, exc.message, exc.field) from None
    except TemporaryAcceptError as exc:
        raise HTTPException(
            503,
            error_body("unavailable", str(exc)),
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None


@router.post(
    "/messages",
    status_code=202,
    response_model=SendResponse,
    responses=_errors(403, 409, 413, 503),
    summary="Send a message",
)
async def send_message(
    body: SendRequest,
    request: Request,
    response: Response,
    app_id: Caller,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=IDEMPOTENCY_KEY_MIN,
            max_length=IDEMPOTENCY_KEY_MAX,
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Repeat a request safely for 24 hours: the same key and body give the "
            "first answer again; the same key with another body is 409",
        ),
    ] = None,
) -> dict[str, Any]:
    """Accept a message for delivery to every `to`, `cc` and `bcc` recipient: 202 once it is
    stored, with one delivery per recipient. A repeated Idempotency-Key with the same body
    answers as the first time, with the header `Idempotent-Replayed: true`."""
    data = await request.json() if idempotency_key else None
    accepted = await _accept(request, app_id, body, idempotency_key, data)
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return accepted.as_json()


# -- POST /messages before FastAPI's router -------------------------------------------------------
# Routing, middleware and dependency solving cost more CPU than accepting a small message. The
# fast path reads the request as FastAPI's route does (auth before the body, the same cap, the
# same JSON and content-type rules, the same validation in the same order) and shares `_accept`.

SEND_PATH = router.prefix + "/messages"
_SEND_REQUEST: TypeAdapter[SendRequest] = TypeAdapter(SendRequest)
_SEND_RESPONSE: TypeAdapter[SendResponse] = TypeAdapter(SendResponse)
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(
    Annotated[
        str,
        StringConstraints(
            min_length=IDEMPOTENCY_KEY_MIN,
            max_length=IDEMPOTENCY_KEY_MAX,
            pattern=IDEMPOTENCY_KEY_PATTERN,
        ),
    ]
)
_NO_BODY = object()


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: a body is JSON when its Content-Type is application/json or
    application/*+json; without a Content-Type it is not."""
    if not content_type:
        return False
    if content_type == "application/json":
        return True
    message = MimeHeaders()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _located(errors: list[Any], *prefix: str) -> list[Any]:
    return [{**e, "loc": (*prefix, *e.get("loc", ()))} for e in errors]


async def _read_body(request: _CappedRequest) -> Any:
    """The body as FastAPI's route takes it: parsed JSON, bytes if not JSON, or _NO_BODY."""
    raw_body = await request.body()
    if not raw_body:
        return _NO_BODY
    if _is_json(request.headers.get("content-type")):
        return await request.json()
    return raw_body


async def _fast_send(request: _CappedRequest) -> Response:
    """POST /api/v1/messages as the FastAPI route answers it."""
    # FastAPI reads and parses the body before it solves dependencies: without a key,
    # answer 401 before taking tens of megabytes from a stranger.
    app_id = await caller_app_id(request)
    try:
        data = await _read_body(request)
    except json.JSONDecodeError as exc:
        return validation_error(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]
        )
    except HTTPException:  # 413
        raise
    except Exception:  # not UTF-8, the client gone …: FastAPI's answer
        raise HTTPException(400, "There was an error parsing the body") from None
    errors: list[Any] = []
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None:
        try:
            idempotency_key = _IDEMPOTENCY_KEY.validate_python(idempotency_key)
        except ValidationError as exc:
            errors += _located(exc.errors(include_url=False), "header", "Idempotency-Key")
    body: SendRequest | None = None
    if data is _NO_BODY:
        errors.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
    else:
        try:
            body = _SEND_REQUEST.validate_python(data, from_attributes=True)
        except ValidationError as exc:
            errors += _located(exc.errors(include_url=False), "body")
    if errors or body is None:
        return validation_error(errors)
    accepted = await _accept(request, app_id, body, idempotency_key, data)
    content = _SEND_RESPONSE.dump_json(_SEND_RESPONSE.validate_python(accepted.as_json()))
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else None
    return Response(content, status_code=202, headers=headers, media_type="application/json")


async def _error_response(app: FastAPI, request: Request, exc: Exception) -> Response:
    """What the app's own exception handler for `exc` answers (postbode.web.errors)."""
    for kind in type(exc).__mro__:
        handler = app.exception_handlers.get(kind)
        if handler is not None:
            response = handler(request, exc)
            return await response if inspect.isawaitable(response) else response
    raise exc


def fast_path(app: FastAPI, then: ASGIApp | None = None) -> ASGIApp:
    """`app` with POST /api/v1/messages answered before its router and middleware, exactly
    as its route would; everything else (the lifespan too) goes to `then` (default `app`)."""
    following: ASGIApp = app if then is None else then

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == SEND_PATH:
            scope["app"] = app
            request = _CappedRequest(scope, receive)
            try:
                response = await _fast_send(request)
            except (ApiError, HTTPException) as exc:
                response = await _error_response(app, request, exc)
            await response(scope, receive, send)
            return
        await following(scope, receive, send)

    return serve


# -- POST /messages/batch -------------------------------------------------------------------------

MAX_BATCH_ITEMS = 500


class BatchRecipient(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    to: AddressField
    model: Annotated[dict[str, Any], Field(max_length=1000)] | None = Field(
        None, description="Merged over the message's `model` for this recipient"
    )
    idempotency_key: (
        Annotated[
            str,
            StringConstraints(
                min_length=IDEMPOTENCY_KEY_MIN,
                max_length=IDEMPOTENCY_KEY_MAX,
                pattern=IDEMPOTENCY_KEY_PATTERN,
            ),
        ]
        | None
    ) = None


class BatchItem(SendRequest):
    idempotency_key: (
        Annotated[
            str,
            StringConstraints(
                min_length=IDEMPOTENCY_KEY_MIN,
                max_length=IDEMPOTENCY_KEY_MAX,
                pattern=IDEMPOTENCY_KEY_PATTERN,
            ),
        ]
        | None
    ) = Field(None, description="This item's Idempotency-Key (24 hours, as the header's)")


class BatchResult(BaseModel):
    index: int
    status: Literal["accepted", "error"]
    id: UUID | None = None
    message_id: str | None = None
    recipients: list[RecipientOut] | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    accepted: int
    failed: int
    data: list[BatchResult] = Field(description="One per item, in the request's order")


_BATCH_ITEM: TypeAdapter[BatchItem] = TypeAdapter(BatchItem)
_BATCH_RECIPIENT: TypeAdapter[BatchRecipient] = TypeAdapter(BatchRecipient)


@dataclass
class _Item:
    index: int
    prefix: str  # `messages.3` or `recipients.3`: where its errors' fields are
    data: Any  # the item's JSON, for its Idempotency-Key fingerprint
    body: SendRequest | None = None
    key: str | None = None
    made: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    accepted: Accepted | None = None


def _item_error(code: str, message: str, field_name: str | None) -> dict[str, Any]:
    return {"code": code, "message": message, "field": field_name}


def _batch_items(data: Any) -> list[_Item]:
    """The batch's items, each validated on its own: an invalid one carries its error."""
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "send a JSON object", None)
    unknown = set(data) - {"messages", "message", "recipients"}
    if unknown:
        raise ApiError(422, "unknown_field", "unknown field", sorted(unknown)[0])
    items: list[_Item] = []
    if "messages" in data:
        if "message" in data or "recipients" in data:
            raise ApiError(422, "invalid", "give messages, or message and recipients", "messages")
        entries = data["messages"]
        if not isinstance(entries, list) or not entries:
            raise ApiError(422, "invalid", "a list of 1 to 500 messages", "messages")
        if len(entries) > MAX_BATCH_ITEMS:
            raise ApiError(
                422, "too_many", f"at most {MAX_BATCH_ITEMS} messages in a batch", "messages"
            )
        for i, entry in enumerate(entries):
            item = _Item(i, f"messages.{i}", entry)
            try:
                checked = _BATCH_ITEM.validate_python(entry)
            except ValidationError as exc:
                code, message, where = describe_validation_error(
                    _located(exc.errors(include_url=False), "body")
                )
                item.error = _item_error(code, message, f"messages.{i}.{where or ''}".rstrip("."))
            else:
                item.key = checked.idempotency_key
                item.body = SendRequest.model_construct(
                    **{k: getattr(checked, k) for k in SendRequest.model_fields},
                    _fields_set=checked.model_fields_set - {"idempotency_key"},
                )
            items.append(item)
        return items
    if "message" not in data or "recipients" not in data:
        raise ApiError(422, "missing", "give messages, or message and recipients", "messages")
    try:
        base = _SEND_REQUEST.validate_python(data["message"])
    except ValidationError as exc:
        code, message, where = describe_validation_error(
            _located(exc.errors(include_url=False), "body")
        )
        raise ApiError(422, code, message, f"message.{where or ''}".rstrip(".")) from None
    if base.to or base.cc or base.bcc:
        raise ApiError(422, "invalid", "recipients come from `recipients`", "message.to")
    entries = data["recipients"]
    if not isinstance(entries, list) or not entries:
        raise ApiError(422, "invalid", "a list of 1 to 500 recipients", "recipients")
    if len(entries) > MAX_BATCH_ITEMS:
        raise ApiError(
            422, "too_many", f"at most {MAX_BATCH_ITEMS} recipients in a batch", "recipients"
        )
    for i, entry in enumerate(entries):
        item = _Item(i, f"recipients.{i}", {"message": data["message"], "recipient": entry})
        try:
            rcpt = _BATCH_RECIPIENT.validate_python(entry)
        except ValidationError as exc:
            code, message, where = describe_validation_error(
                _located(exc.errors(include_url=False), "body")
            )
            item.error = _item_error(code, message, f"recipients.{i}.{where or ''}".rstrip("."))
        else:
            model = {**(base.model or {}), **(rcpt.model or {})} if base.template else None
            item.key = rcpt.idempotency_key
            item.body = base.model_copy(update={"to": [rcpt.to], "model": model})
        items.append(item)
    return items


def _render_batch(items: list[_Item], cache: TemplateCache, max_recipients: int) -> None:
    """Each item's template rendered (one template resolved once), errors kept per item."""
    for item in items:
        if item.body is None:
            continue
        try:
            recipients = _recipients(item.body, max_recipients)
            item.body, item.made = with_template(item.body, cache, recipients[0])
        except ApiError as exc:
            item.error = _prefixed(exc, item)


def _prefixed(exc: ApiError, item: _Item) -> dict[str, Any]:
    error = dict(exc.body["error"])
    return _item_error(error["code"], error["message"], _field_of(item, error.get("field")))


def _field_of(item: _Item, name: str | None) -> str:
    return f"{item.prefix}.{name}" if name else item.prefix


@router.post(
    "/messages/batch",
    response_model=BatchResponse,
    responses=_errors(413),
    summary="Send up to 500 messages, or one message to up to 500 recipients each rendered",
)
async def send_batch(
    request: Request,
    app_id: Caller,
    data: Annotated[
        dict[str, Any],
        fastapi.Body(
            description='`{"messages": [message, …]}` with up to 500 messages as '
            "`POST /api/v1/messages` takes them (each may add `idempotency_key`), or "
            '`{"message": message, "recipients": [{"to", "model"?, '
            '"idempotency_key"?}, …]}`: one message (without to/cc/bcc) for up to 500 '
            "recipients, each rendered with the message's `model` updated by their own.",
            openapi_examples={
                "recipients": {
                    "value": {
                        "message": {
                            "from": "orders@shop.test",
                            "template": "welcome",
                            "model": {"plan": "Gold"},
                        },
                        "recipients": [
                            {"to": "ann@example.com", "model": {"name": "Ann"}},
                            {"to": "bob@example.com", "model": {"name": "Bob"}},
                        ],
                    }
                }
            },
        ),
    ],
) -> dict[str, Any]:
    """Each item is accepted or refused on its own: the answer lists, in order, each item's
    message id and deliveries, or its error (with `field` prefixed by the item's index). An
    item's `idempotency_key` makes repeating it safe, as the header does for one message."""
    items = _batch_items(data)
    settings: Settings = request.app.state.settings
    acceptor: Acceptor = request.app.state.acceptor
    if any(i.body is not None and (i.body.template or i.body.model) for i in items):
        cache = TemplateCache(request.app.state.store, app_id)
        await run_in_threadpool(_render_batch, items, cache, settings.smtp_max_recipients)
    client = request.scope.get("client")
    pending: list[tuple[_Item, Any]] = []
    for item in items:
        if item.body is None or item.error is not None:
            continue
        try:
            body = item.body
            recipients = _recipients(body, settings.smtp_max_recipients)
            submission = Submission(
                app_id=app_id,
                source="api",
                mail_from=body.from_.address,
                recipients=recipients,
                raw=build(body, settings.smtp_max_message_size),
                stream=body.stream,
                tag=body.tag,
                metadata=dict(body.metadata or {}),
                track_opens=body.track_opens,
                track_clicks=body.track_clicks,
                client_ip=client[0] if client else None,
                idempotency_key=item.key,
                request_hash=request_hash(_canonical(item.data)) if item.key else None,
                send_at=send_at_of(body),
                **item.made,
            )
        except ApiError as exc:
            item.error = _prefixed(exc, item)
            continue
        pending.append((item, acceptor.accept(submission)))
    results = await asyncio.gather(*(p for _, p in pending), return_exceptions=True)
    for (item, _), result in zip(pending, results, strict=True):
        if isinstance(result, AcceptError):
            item.error = _item_error(result.reason, result.message, _field_of(item, result.field))
        elif isinstance(result, TemporaryAcceptError):
            item.error = _item_error("unavailable", str(result), None)
        elif isinstance(result, BaseException):
            raise result
        else:
            item.accepted = result
    out: list[dict[str, Any]] = []
    for item in items:
        if item.accepted is not None:
            out.append({"index": item.index, "status": "accepted", **item.accepted.as_json()})
        else:
            out.append({"index": item.index, "status": "error", "error": item.error})
    accepted = sum(1 for i in items if i.accepted is not None)
    return {"accepted": accepted, "failed": len(items) - accepted, "data": out}


# -- GET /messages/{id} ---------------------------------------------------------------------------


def _message_fields(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "message_id": row.message_id_header,
        "from": row.from_header,
        "mail_from": row.mail_from,
        "subject": row.subject,
        "tag": row.tag,
        "metadata": row.metadata or {},
        "stream": row.stream,
        "source": row.source,
        "received_at": row.received_at,
        "size": row.size,
    }


def load_message(conn: Connection, app_id: int, id: UUID) -> dict[str, Any]:
    msg = conn.execute(
        select(messages).where(messages.c.id == id, messages.c.app_id == app_id)
    ).first()
    if msg is None:  # another app's message is as absent as a message that never was
        raise ApiError(404, "not_found", f"no message {id}", "id")
    dels = conn.execute(
        select(deliveries)
        .where(deliveries.c.message_id == id)
        .order_by(deliveries.c.recipient, deliveries.c.id)
    ).all()
    tries = conn.execute(
        select(attempts, deliveries.c.recipient)
        .join(deliveries, deliveries.c.id == attempts.c.delivery_id)
        .where(deliveries.c.message_id == id)
        .order_by(attempts.c.started_at, attempts.c.id)
    ).all()
    happened = conn.execute(
        select(events)
        .where(events.c.message_id == id, events.c.app_id == app_id)
        # Events of one instant: the message's own first (message.received before the queueing).
        .order_by(
            events.c.created_at, case((events.c.type.like("message.%"), 0), else_=1), events.c.id
        )
    ).all()
    return {
        **_message_fields(msg),
        "track_opens": msg.track_opens,
        "track_clicks": msg.track_clicks,
        "content": None
        if msg.spam_score is None
        else {"score": msg.spam_score, "symbols": msg.spam_symbols or []},
        "recipients": [
            {
                "email": d.recipient,
                "delivery_id": d.id,
                "status": d.status,
                "attempts": d.attempts,
                "last_attempt_at": d.last_attempt_at,
                "next_attempt_at": d.next_attempt_at if d.status in _PENDING else None,
                "mx": d.mx,
                "last_reply": d.last_reply,
                "bounce_category": d.bounce_category,
                "bounce_status": d.bounce_status,
                "hard": d.hard,
            }
            for d in dels
        ],
        "attempts": [
            {
                "id": a.id,
                "delivery_id": a.delivery_id,
                "recipient": a.recipient,
                "started_at": a.started_at,
                "duration_ms": a.duration_ms,
                "outcome": a.outcome,
                "mx_host": a.mx_host,
                "ip": a.ip,
                "port": a.port,
                "tls_version": a.tls_version,
                "tls_cipher": a.tls_cipher,
                "reply_code": a.reply_code,
                "enhanced_status": a.enhanced_status,
                "reply_text": a.reply_text,
                "transcript": a.transcript,
            }
            for a in tries
        ],
        "events": [
            {
                "id": e.id,
                "type": e.type,
                "at": e.created_at,
                "delivery_id": e.delivery_id,
                "recipient": e.recipient,
                "data": e.data or {},
            }
            for e in happened
        ],
    }


@router.get(
    "/messages/{id}",
    response_model=MessageDetail,
    responses=_errors(404),
    summary="A message with its deliveries, attempts and events",
)
def get_message(id: UUID, request: Request, app_id: Caller) -> dict[str, Any]:
    """The message, each recipient's delivery status, every delivery attempt (with the SMTP
    transcript) and every event, oldest first."""
    store: Store = request.app.state.store
    with store.read() as conn:
        return load_message(conn, app_id, id)


# -- GET /messages --------------------------------------------------------------------------------


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def address_forms(value: str) -> list[str]:
    """A recipient as it may be stored: normalised, with the domain in IDNA and Unicode form."""
    try:
        address = normalise_address(value)
    except AcceptError:
        raise ApiError(422, "invalid", "not an e-mail address", "recipient") from None
    local, _, domain = address.rpartition("@")
    forms = [address]
    with contextlib.suppress(UnicodeError):
        forms.append(f"{local}@{domain.encode('idna').decode('ascii')}")
    with contextlib.suppress(UnicodeError):
        forms.append(f"{local}@{domain.encode('ascii').decode('idna')}")
    return list(dict.fromkeys(forms))


@router.get(
    "/messages",
    response_model=MessageList,
    summary="List messages, newest first",
)
def list_messages(
    request: Request,
    app_id: Caller,
    recipient: Annotated[
        str | None, Query(max_length=320, description="Messages to this address")
    ] = None,
    status: Annotated[
        DeliveryStatus | None,
        Query(description="Messages with a delivery in this state (to `recipient`, if given)"),
    ] = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    since: Annotated[
        Instant | None, Query(description="Received at or after (ISO 8601; UTC if no zone)")
    ] = None,
    until: Annotated[Instant | None, Query(description="Received before")] = None,
    reply: Annotated[
        str | None, Query(max_length=998, description="Part of a delivery's last reply")
    ] = None,
    category: Annotated[
        str | None,
        Query(max_length=32, description="A delivery's bounce category (e.g. `user_unknown`)"),
    ] = None,
    mx: Annotated[
        str | None, Query(max_length=253, description="Part of the MX host a delivery was tried at")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    cursor: Annotated[UUID | None, Query(description="`next_cursor` of the previous page")] = None,
) -> dict[str, Any]:
    """The caller's messages, newest first, a page at a time (keyset pagination on the
    time-ordered message id). `recipient`, `status`, `reply`, `category` and `mx` must all
    hold for the same delivery; each recipient says whether it is one that `matched`.

    `reply` and `mx` (without `recipient`) look at 5,000 messages per page at most: a page
    may then hold fewer than `limit` (even none) and still have a `next_cursor` to go on
    with. Follow `next_cursor` until it is null to see every match."""
    store: Store = request.app.state.store
    query = select(messages).where(messages.c.app_id == app_id)
    if tag is not None:
        query = query.where(messages.c.tag == tag)
    if (start := _utc(since)) is not None:
        query = query.where(messages.c.received_at >= start)
    if (end := _utc(until)) is not None:
        query = query.where(messages.c.received_at < end)
    if cursor is not None:
        query = query.where(messages.c.id < cursor)
    # Every delivery filter holds for one and the same delivery.
    per_delivery: list[Any] = []
    if status is not None:
        per_delivery.append(deliveries.c.status == status)
    if reply:
        per_delivery.append(deliveries.c.last_reply.icontains(reply.strip(), autoescape=True))
    if category is not None:
        if category not in CATEGORIES:
            raise ApiError(422, "invalid", f"one of: {', '.join(CATEGORIES)}", "category")
        per_delivery.append(deliveries.c.bounce_category == category)
    if mx:
        per_delivery.append(deliveries.c.mx.icontains(mx.strip().rstrip("."), autoescape=True))
    if recipient is not None:
        # Local parts are matched without regard to case, as people type them. The address's
        # own index finds its few messages first (an EXISTS per message would scan them all).
        forms = [f.lower() for f in address_forms(recipient)]
        per_delivery.append(func.lower(deliveries.c.recipient).in_(forms))
        wanted = select(deliveries.c.message_id).where(deliveries.c.app_id == app_id, *per_delivery)
        query = query.where(messages.c.id.in_(wanted))
    else:
        match = select(deliveries.c.id).where(
            deliveries.c.message_id == messages.c.id,
            deliveries.c.app_id == app_id,
            *per_delivery,
        )
    scanned = bool(reply or mx) and recipient is None
    edge: UUID | None = None
    with store.read() as conn:
        if scanned:
            # The window's last message, on the (app_id[, tag], id) index alone; the page's
            # walk stops there.
            edge = conn.execute(
                query.with_only_columns(messages.c.id)
                .order_by(messages.c.id.desc())
                .offset(SCAN_WINDOW - 1)
                .limit(1)
            ).scalar()
        if edge is not None:
            query = query.where(messages.c.id >= edge)
        if per_delivery and recipient is None:
            query = query.where(match.exists())
        rows = conn.execute(query.order_by(messages.c.id.desc()).limit(limit + 1)).all()
        page = rows[:limit]
        by_message: dict[UUID, list[dict[str, Any]]] = {row.id: [] for row in page}
        if page:
            matched = (
                and_(*per_delivery).label("matched") if per_delivery else true().label("matched")
            )
            for d in conn.execute(
                select(
                    deliveries.c.message_id,
                    deliveries.c.id,
                    deliveries.c.recipient,
                    deliveries.c.status,
                    deliveries.c.last_reply,
                    deliveries.c.bounce_category,
                    deliveries.c.mx,
                    matched,
                )
                .where(deliveries.c.message_id.in_(list(by_message)))
                .order_by(deliveries.c.recipient, deliveries.c.id)
            ):
                by_message[d.message_id].append(
                    {
                        "email": d.recipient,
                        "delivery_id": d.id,
                        "status": d.status,
                        "last_reply": d.last_reply,
                        "bounce_category": d.bounce_category,
                        "mx": d.mx,
                        "matched": bool(d.matched),
                    }
                )
    return {
        "data": [{**_message_fields(row), "recipients": by_message[row.id]} for row in page],
        "next_cursor": page[-1].id if len(rows) > limit else edge,
    }
