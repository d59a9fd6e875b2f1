"""Mailgun's send API under /compat/mailgun/v3: `POST /{domain}/messages` with basic auth
`api:KEY`, form fields (`o:`, `h:`, `v:` options, attachments and inline files), answering
`{"id", "message": "Queued. Thank you."}` or `{"message": "…"}`."""

from __future__ import annotations

import base64
import email.utils
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from postbode.ingest.accept import Acceptor
from postbode.web.api.compat import common
from postbode.web.api.compat.schema import form_body

MAX_FORM_FIELDS = 1000
MAX_FORM_FILES = 100
YES = {"yes": True, "true": True, "no": False, "false": False, "htmlonly": True}

# Options Postbode lacks: refused with Mailgun's error shape, never ignored. `template` names
# a Postbode template by its alias, rendered with `t:variables` (or h:X-Mailgun-Variables);
# `o:deliverytime` (RFC 2822) schedules the send.
UNSUPPORTED = {
    "t:version": "template versions are chosen in Postbode (the live one is sent)",
    "recipient-variables": "recipient variables are not supported by this server yet",
    "amp-html": "AMP parts are not supported by this server",
    "o:deliverytime-optimize-period": "send time optimisation is not supported",
    "o:time-zone-localize": "time zone localisation is not supported",
    "o:testmode": "test mode is not supported by this server",
    "o:dkim": "per-message DKIM settings are not supported (every message is signed)",
    "o:sending-ip": "choosing a sending IP is not supported",
    "o:sending-ip-pool": "choosing a sending IP pool is not supported",
}
FIELDS = {
    "from": "from",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply_to": "h:Reply-To",
    "subject": "subject",
    "text": "text",
    "html": "html",
    "attachments": "attachment",
    "tag": "o:tag",
    "metadata": "v:",
}


class MailgunError(Exception):
    """An answer in Mailgun's error shape: `{"message": "…"}`."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"message": self.message},
            status_code=self.status,
            headers=common.retry_headers(self.retry_after),
        )


class MailgunMessage(BaseModel):
    """The form fields of a send (repeat `to`, `cc`, `bcc`, `attachment`, `inline`)."""

    model_config = ConfigDict(extra="allow")

    from_: str = Field(alias="from")
    to: list[str]
    cc: list[str] | None = None
    bcc: list[str] | None = None
    subject: str
    text: str | None = None
    html: str | None = None
    attachment: list[bytes] | None = Field(None, description="Files")
    inline: list[bytes] | None = Field(None, description="Files; the file name is the cid")
    o_tag: str | None = Field(None, alias="o:tag", description="One tag")
    o_tracking: str | None = Field(None, alias="o:tracking")
    o_tracking_opens: str | None = Field(None, alias="o:tracking-opens")
    o_tracking_clicks: str | None = Field(None, alias="o:tracking-clicks")


class MailgunQueued(BaseModel):
    id: str = Field(description="The Message-ID header, in angle brackets")
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request: `{message}`"},
    401: {"description": "Bad or missing key"},
    403: {"description": "The From domain is not a domain of this app"},
    404: {"description": "The domain in the path is not a domain of this app"},
}


async def _caller(request: Request) -> int:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    key = ""
    if scheme.lower() == "basic":
        try:
            _user, _, key = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            key = ""
    app_id = await common.app_for_key(request, key) if key else None
    if app_id is None:
        raise MailgunError(401, "Invalid private key")
    return app_id


async def _form(request: Request) -> FormData:
    """The form, its body read under the API's cap first."""
    try:
        raw = await common.read_body(request)
    except common.TooLarge as exc:
        raise MailgunError(413, str(exc)) from None
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    buffered = Request(request.scope, replay)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise MailgunError(400, "Send the message as multipart/form-data.")
    try:
        return await buffered.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as exc:  # a malformed or oversized form: the parser's own reason
        raise MailgunError(400, f"Malformed form data: {exc}") from None


def _texts(form: FormData, name: str) -> list[str]:
    return [v for v in form.getlist(name) if isinstance(v, str)]


def _one(form: FormData, name: str) -> str | None:
    found = _texts(form, name)
    return found[-1] if found else None


async def _files(form: FormData, name: str, inline: bool) -> list[dict[str, Any]]:
    out = []
    for value in form.getlist(name):
        if not isinstance(value, UploadFile):
            raise MailgunError(400, f"'{name}' parameter is not a file")
        data = await value.read()
        filename = value.filename or "attachment"
        item: dict[str, Any] = {
            "filename": filename,
            "content": base64.b64encode(data).decode("ascii"),
        }
        if value.content_type and value.content_type != "application/octet-stream":
            item["content_type"] = value.content_type.split(";")[0].strip()
        if inline:
            item["content_id"] = filename  # Mailgun: an inline file's name is its cid
        out.append(item)
    return out


def _flag(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    if value.lower() not in YES:
        raise MailgunError(400, f"'{name}' parameter must be yes or no")
    return YES[value.lower()]


async def translate(form: FormData) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The native send request of a Mailgun form, and its address lists (for errors)."""
    for name in form:
        why = UNSUPPORTED.get(name)
        if why is None and name.startswith("t:") and name not in ("t:variables", "t:text"):
            why = "only t:variables and t:text go with a template here"
        if why is not None:
            raise MailgunError(400, f"'{name}' parameter is not supported: {why}")
    sender = _one(form, "from")
    if not sender:
        raise MailgunError(400, "from parameter is missing")
    lists = {
        name: [a for value in _texts(form, name) for a in common.split_addresses(value)]
        for name in ("to", "cc", "bcc")
    }
    if not lists["to"]:
        raise MailgunError(400, "to parameter is missing")
    body: dict[str, Any] = {"from": sender, **{k: v for k, v in lists.items() if v}}
    template = _one(form, "template")
    subject = _one(form, "subject")
    if template is not None:
        body["template"] = template
        body["model"] = _variables(form)
        for name in ("subject", "text", "html"):
            if _one(form, name) is not None:
                raise MailgunError(400, f"'{name}' comes from the template: leave it out")
    else:
        if subject is None:
            raise MailgunError(400, "subject parameter is missing")
        body["subject"] = subject
        for name in ("text", "html"):
            value = _one(form, name)
            if value is not None:
                body[name] = value
        if "text" not in body and "html" not in body:
            raise MailgunError(400, "Need at least one of 'text' or 'html' parameters specified")
    delivery_time = _one(form, "o:deliverytime")
    if delivery_time is not None:
        try:
            at = email.utils.parsedate_to_datetime(delivery_time)
        except (TypeError, ValueError):
            raise MailgunError(
                400, "'o:deliverytime' parameter is not a valid RFC 2822 date"
            ) from None
        body["send_at"] = at.isoformat()
    tags = _texts(form, "o:tag")
    if len(tags) > 1:
        raise MailgunError(
            400, "Only one o:tag per message is supported by this server (the message's tag)"
        )
    if tags:
        body["tag"] = tags[0]
    tracking = _flag(_one(form, "o:tracking"), "o:tracking")
    opens = _flag(_one(form, "o:tracking-opens"), "o:tracking-opens")
    clicks = _flag(_one(form, "o:tracking-clicks"), "o:tracking-clicks")
    if tracking is False:
        opens, clicks = False, False
    if opens is not None:
        body["track_opens"] = opens
    if clicks is not None:
        body["track_clicks"] = clicks
    headers: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name in form:
        value = _one(form, name)
        if value is None:
            continue
        if name.lower() == "h:reply-to":
            replies = common.split_addresses(value)
            if replies:
                body["reply_to"] = replies[0]
        elif name.startswith("h:"):
            headers[name[2:]] = value
        elif name.startswith("v:"):
            metadata[name[2:]] = value
        elif name.startswith("o:") and name not in (
            "o:deliverytime",
            "o:tag",
            "o:tracking",
            "o:tracking-opens",
            "o:tracking-clicks",
        ):
            raise MailgunError(400, f"'{name}' parameter is not supported by this server")
    if headers:
        body["headers"] = headers
    if metadata:
        body["metadata"] = metadata
    attachments = await _files(form, "attachment", False) + await _files(form, "inline", True)
    if attachments:
        body["attachments"] = attachments
    return body, lists


def _variables(form: FormData) -> dict[str, Any]:
    """A template's model: t:variables, else h:X-Mailgun-Variables (JSON objects)."""
    for name in ("t:variables", "h:X-Mailgun-Variables"):
        text = _one(form, name)
        if text is None:
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise MailgunError(400, f"'{name}' parameter is not valid JSON") from None
        if not isinstance(value, dict):
            raise MailgunError(400, f"'{name}' parameter must be a JSON object")
        return value
    return {}


def refusal(exc: common.Refusal, domain: str, lists: dict[str, list[str]]) -> MailgunError:
    head, index, _ = common.native_field(exc.field)
    if exc.code == "foreign_domain":
        return MailgunError(403, f"Domain {domain} is not allowed to send: {exc.message}")
    if exc.code == "app_suspended":
        return MailgunError(403, f"Domain {domain} is not allowed to send: the app is suspended")
    if exc.status in (413, 429) or exc.status >= 500:
        return MailgunError(exc.status, exc.message, exc.retry_after)
    if head in lists and index is not None and index < len(lists[head]):
        return MailgunError(
            400, f"'{head}' parameter is not a valid address. please check documentation"
        )
    if head == "from":
        return MailgunError(
            400, "'from' parameter is not a valid address. please check documentation"
        )
    name = FIELDS.get(head, head)
    return MailgunError(
        400, f"'{name}' parameter is invalid: {exc.message}" if name else exc.message
    )


def _app_domains(acceptor: Acceptor, app_id: int) -> set[str]:
    return set(acceptor.app_info(app_id).domains)


router = APIRouter(prefix="/compat/mailgun/v3", tags=["compat: mailgun"])


@router.post(
    "/{domain}/messages",
    response_model=MailgunQueued,
    responses=_ERRORS,
    summary="Send a message (Mailgun)",
    openapi_extra=form_body(MailgunMessage),
)
async def messages(domain: str, request: Request) -> JSONResponse:
    """Mailgun's send: `domain` must be one of the app's sending domains."""
    lists: dict[str, list[str]] = {}
    try:
        app_id = await _caller(request)
        acceptor: Acceptor = request.app.state.acceptor
        names = await run_in_threadpool(_app_domains, acceptor, app_id)
        if domain.lower().rstrip(".") not in names:
            raise MailgunError(404, f"Domain not found: {domain}")
        form = await _form(request)
        try:
            body, lists = await translate(form)
            accepted = await common.accept(request, app_id, common.validate(body))
        except common.Refusal as exc:
            raise refusal(exc, domain, lists) from None
        finally:
            await form.close()
    except MailgunError as exc:
        return exc.response()
    return JSONResponse({"id": accepted.message_id_header, "message": "Queued. Thank you."})
