"""Postmark's send API (`/email`, `/email/batch`) under /compat/postmark, and at the root for
requests carrying X-Postmark-Server-Token (postmarker drops any prefix of its base URL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.ingest.accept import Accepted
from postbode.templates import manage as template_manage
from postbode.web.api.compat import common
from postbode.web.api.compat.schema import json_body

MAX_BATCH = 500  # Postmark's limit of messages in one /email/batch request
TOKEN_HEADER = "X-Postmark-Server-Token"  # noqa: S105 (a header name)

# Postmark's API error codes (its "API error codes" reference) that Postbode answers with.
BAD_TOKEN = 10
INVALID_REQUEST = 300
SENDER_NOT_FOUND = 400
INVALID_JSON = 402
NOT_ALLOWED_TO_SEND = 405
INACTIVE_RECIPIENT = 406
JSON_REQUIRED = 409
TOO_MANY_BATCH = 410
RATE_LIMITED = 429
STREAM_NOT_FOUND = 1235
TEMPLATE_NOT_FOUND = 1101

# Native field -> Postmark's name for it, for error messages.
FIELDS = {
    "from": "From",
    "to": "To",
    "cc": "Cc",
    "bcc": "Bcc",
    "reply_to": "ReplyTo",
    "subject": "Subject",
    "text": "TextBody",
    "html": "HtmlBody",
    "headers": "Headers",
    "attachments": "Attachments",
    "tag": "Tag",
    "metadata": "Metadata",
    "stream": "MessageStream",
    "track_opens": "TrackOpens",
    "track_clicks": "TrackLinks",
}
STREAMS = {"outbound": "transactional", "broadcast": "broadcast"}
TRACK_LINKS = ("None", "HtmlAndText", "HtmlOnly", "TextOnly")
# Fields of Postmark's template sends (/email/withTemplate, /email/batchWithTemplates): a
# Postbode template by alias (TemplateAlias) or id (TemplateId), rendered with TemplateModel;
# CSS is always inlined. In /email they are refused, as Postmark refuses them there.
TEMPLATE_FIELDS = ("TemplateId", "TemplateAlias", "TemplateModel", "InlineCss")


class PostmarkError(Exception):
    """An answer in Postmark's error shape: `{"ErrorCode": n, "Message": "…"}`."""

    def __init__(
        self, status: int, error_code: int, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"ErrorCode": self.error_code, "Message": self.message}

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body(), status_code=self.status, headers=common.retry_headers(self.retry_after)
        )


# -- the request as Postmark documents it (for the OpenAPI document) ---------------------------


class PostmarkHeader(BaseModel):
    Name: str
    Value: str


class PostmarkAttachment(BaseModel):
    Name: str
    Content: str = Field(description="base64")
    ContentType: str | None = None
    ContentID: str | None = Field(None, description="`cid:…`: an inline image")


class PostmarkEmail(BaseModel):
    model_config = ConfigDict(extra="allow")

    From: str
    To: str | None = Field(None, description="Comma-separated, at most 50 together with Cc, Bcc")
    Cc: str | None = None
    Bcc: str | None = None
    Subject: str | None = None
    Tag: str | None = None
    HtmlBody: str | None = None
    TextBody: str | None = None
    ReplyTo: str | None = None
    Headers: list[PostmarkHeader] | None = None
    TrackOpens: bool | None = None
    TrackLinks: str | None = Field(None, description="None, HtmlAndText, HtmlOnly, TextOnly")
    Metadata: dict[str, str] | None = None
    Attachments: list[PostmarkAttachment] | None = None
    MessageStream: str | None = Field(None, description="`outbound` (default) or `broadcast`")


class PostmarkSent(BaseModel):
    To: str | None = None
    SubmittedAt: str | None = None
    MessageID: str | None = None
    ErrorCode: int
    Message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Bad or missing server token (ErrorCode 10)"},
    422: {"description": "Refused: `{ErrorCode, Message}` as Postmark answers"},
}


# -- authentication -------------------------------------------------------------------------


async def _caller(request: Request) -> int:
    token = request.headers.get(TOKEN_HEADER)
    if token is None or not token.strip():
        raise PostmarkError(401, BAD_TOKEN, "Request does not contain a valid Server token.")
    app_id = await common.app_for_key(request, token)
    if app_id is None:
        raise PostmarkError(
            401,
            BAD_TOKEN,
            f"The Server Token you provided in the {TOKEN_HEADER} request header was "
            "invalid. Please verify that you are using a valid token.",
        )
    return app_id


async def _root_only_with_token(request: Request) -> None:
    """The root paths belong to Postmark's API only for requests carrying its token."""
    if TOKEN_HEADER.lower() not in request.headers:
        raise HTTPException(404, "Not Found")


# -- translation ------------------------------------------------------------------------------


def _text(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PostmarkError(422, INVALID_REQUEST, f"Invalid '{name}': must be a string.")
    return value


def translate(
    data: Any, template: str | None = None
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The native send request for one Postmark message, and its address lists by native
    field (for error messages); PostmarkError for what Postmark itself would refuse.
    `template`: the alias of the template a /withTemplate request names."""
    if not isinstance(data, dict):
        raise PostmarkError(422, INVALID_JSON, "The request body must be a JSON object.")
    if template is None:
        for name in TEMPLATE_FIELDS:
            if data.get(name) is not None:
                raise PostmarkError(
                    422,
                    INVALID_REQUEST,
                    f"Invalid email request: '{name}' belongs to /email/withTemplate.",
                )
    lists = {
        "to": common.split_addresses(_text(data, "To")),
        "cc": common.split_addresses(_text(data, "Cc")),
        "bcc": common.split_addresses(_text(data, "Bcc")),
    }
    if not any(lists.values()):
        raise PostmarkError(422, INVALID_REQUEST, "Zero recipients specified")
    sender = _text(data, "From")
    if not sender:
        raise PostmarkError(422, INVALID_REQUEST, "Invalid 'From' address: ''.")
    body: dict[str, Any] = {"from": sender, **{k: v for k, v in lists.items() if v}}
    if template is not None:
        for name in ("Subject", "TextBody", "HtmlBody"):
            if data.get(name) is not None:
                raise PostmarkError(
                    422,
                    INVALID_REQUEST,
                    f"Invalid email request: '{name}' comes from the template.",
                )
        model = data.get("TemplateModel")
        if model is not None and not isinstance(model, dict):
            raise PostmarkError(422, INVALID_REQUEST, "Invalid 'TemplateModel': an object.")
        body["template"] = template
        body["model"] = model or {}
    else:
        subject = _text(data, "Subject")
        if subject is not None:
            body["subject"] = subject
        for native, name in (("text", "TextBody"), ("html", "HtmlBody")):
            value = _text(data, name)
            if value is not None:
                body[native] = value
        if "text" not in body and "html" not in body:
            raise PostmarkError(
                422, INVALID_REQUEST, "Provide either email TextBody or HtmlBody or both."
            )
    reply_to = common.split_addresses(_text(data, "ReplyTo"))
    if reply_to:
        body["reply_to"] = reply_to[0]
    tag = _text(data, "Tag")
    if tag:
        body["tag"] = tag
    stream = _text(data, "MessageStream")
    if stream:
        if stream not in STREAMS:
            raise PostmarkError(
                422,
                STREAM_NOT_FOUND,
                f"The message stream for the provided 'ID' ({stream}) was not found. "
                "Postbode's streams are 'outbound' and 'broadcast'.",
            )
        body["stream"] = STREAMS[stream]
    if data.get("TrackOpens") is not None:
        body["track_opens"] = data["TrackOpens"]
    links = data.get("TrackLinks")
    if links is not None:
        if links not in TRACK_LINKS:
            raise PostmarkError(
                422, INVALID_REQUEST, f"Invalid 'TrackLinks': use one of {', '.join(TRACK_LINKS)}."
            )
        body["track_clicks"] = links != "None"
    if data.get("Metadata") is not None:
        body["metadata"] = data["Metadata"]
    headers = data.get("Headers")
    if headers:
        if not isinstance(headers, list):
            raise PostmarkError(422, INVALID_REQUEST, "Invalid 'Headers': must be a list.")
        extra: dict[str, Any] = {}
        for item in headers:
            if not isinstance(item, dict) or "Name" not in item:
                raise PostmarkError(
                    422, INVALID_REQUEST, "Invalid 'Headers': each needs Name and Value."
                )
            extra[str(item["Name"])] = item.get("Value", "")
        body["headers"] = extra
    attachments = data.get("Attachments")
    if attachments:
        if not isinstance(attachments, list):
            raise PostmarkError(422, INVALID_REQUEST, "Invalid 'Attachments': must be a list.")
        body["attachments"] = [_attachment(a) for a in attachments]
    return body, lists


def _attachment(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise PostmarkError(422, INVALID_REQUEST, "Invalid 'Attachments': each is an object.")
    out: dict[str, Any] = {"filename": item.get("Name"), "content": item.get("Content")}
    if item.get("ContentType"):
        out["content_type"] = item["ContentType"]
    content_id = item.get("ContentID")
    if content_id:
        # Postmark writes inline images' ids as `cid:logo.png`.
        out["content_id"] = str(content_id).removeprefix("cid:")
    return out


def refusal(exc: common.Refusal, lists: dict[str, list[str]], data: Any) -> PostmarkError:
    """A native refusal in Postmark's words (anymail reads some of them: "Invalid 'To'
    address: 'x'." marks that recipient invalid)."""
    head, index, _ = common.native_field(exc.field)
    name = FIELDS.get(head, head)
    if exc.code == "foreign_domain":
        sender = data.get("From", "") if isinstance(data, dict) else ""
        return PostmarkError(
            422,
            SENDER_NOT_FOUND,
            f"The 'From' address you supplied ({sender}) is not a Sender Signature on your "
            "account. Please add and confirm this address in order to be able to use it in "
            "the 'From' field of your messages.",
        )
    if exc.code == "app_suspended":
        return PostmarkError(422, NOT_ALLOWED_TO_SEND, "Not allowed to send: the app is suspended.")
    if exc.status == 429:
        return PostmarkError(
            429, RATE_LIMITED, "Rate limit exceeded: " + exc.message, exc.retry_after
        )
    if exc.status >= 500:
        return PostmarkError(exc.status, 100, "Maintenance: " + exc.message)
    if head in lists and index is not None and index < len(lists[head]):
        return PostmarkError(
            422, INVALID_REQUEST, f"Invalid '{name}' address: '{lists[head][index]}'."
        )
    if head == "from":
        sender = data.get("From", "") if isinstance(data, dict) else ""
        return PostmarkError(422, INVALID_REQUEST, f"Invalid 'From' address: '{sender}'.")
    where = f"'{name}'" if name else "request"
    return PostmarkError(422, INVALID_REQUEST, f"Invalid email request: {where}: {exc.message}")


def sent(accepted: Accepted, lists: dict[str, list[str]]) -> dict[str, Any]:
    """Postmark's success answer for one message."""
    answer: dict[str, Any] = {
        "To": ", ".join(lists["to"]) if lists["to"] else None,
        "SubmittedAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "MessageID": str(accepted.id),
        "ErrorCode": 0,
        "Message": "OK",
    }
    if answer["To"] is None:
        del answer["To"]  # as Postmark: absent for Cc- or Bcc-only messages
    inactive = common.suppressed(accepted)
    if inactive and len(inactive) == len(accepted.recipients):
        raise PostmarkError(
            422,
            INACTIVE_RECIPIENT,
            "You tried to send to recipient(s) that have been marked as inactive. Found "
            f"inactive addresses: {', '.join(inactive)}. Inactive recipients are ones that "
            "have generated a hard bounce or a spam complaint.",
        )
    if inactive:
        answer["Message"] = (
            "Message OK, but will not deliver to these inactive addresses: "
            f"{', '.join(inactive)}. Inactive recipients are ones that have generated a hard "
            "bounce or a spam complaint."
        )
    return answer


async def _template_of(request: Request, app_id: int, data: Any) -> str:
    """The alias a /withTemplate message names by TemplateAlias or TemplateId."""
    if not isinstance(data, dict):
        raise PostmarkError(422, INVALID_JSON, "The request body must be a JSON object.")
    alias, template_id = data.get("TemplateAlias"), data.get("TemplateId")
    if isinstance(alias, str) and alias:
        return alias
    if isinstance(template_id, int) and not isinstance(template_id, bool):
        found = await run_in_threadpool(
            template_manage.alias_of, request.app.state.store, app_id, template_id
        )
        if found is not None:
            return found
        raise PostmarkError(422, TEMPLATE_NOT_FOUND, f"Template {template_id} not found.")
    raise PostmarkError(
        422, INVALID_REQUEST, "Invalid email request: give TemplateAlias or TemplateId."
    )


async def send_one(
    request: Request, app_id: int, data: Any, templated: bool = False
) -> dict[str, Any]:
    lists: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    try:
        template = await _template_of(request, app_id, data) if templated else None
        body, lists = translate(data, template)
        accepted = await common.accept(request, app_id, common.validate(body))
    except common.Refusal as exc:
        raise refusal(exc, lists, data) from None
    return sent(accepted, lists)


async def _send_each(
    request: Request, app_id: int, items: list[Any], *, templated: bool
) -> list[dict[str, Any]]:
    """A batch: each message accepted or refused on its own, each answered in order."""
    if len(items) > MAX_BATCH:
        raise PostmarkError(422, TOO_MANY_BATCH, f"Too many batch messages: at most {MAX_BATCH}.")
    results = []
    for item in items:
        try:
            results.append(await send_one(request, app_id, item, templated=templated))
        except PostmarkError as exc:
            results.append(exc.body())
    return results


async def _json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        raise PostmarkError(
            415 if content_type else 422,
            JSON_REQUIRED,
            "JSON required: send Content-Type: application/json.",
        )
    try:
        raw = await common.read_body(request)
    except common.TooLarge as exc:
        raise PostmarkError(413, INVALID_REQUEST, str(exc)) from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PostmarkError(422, INVALID_JSON, "Invalid JSON: the body does not parse.") from None


# -- routes -----------------------------------------------------------------------------------


def _routes(router: APIRouter) -> None:
    @router.post(
        "/email",
        response_model=PostmarkSent,
        responses=_ERRORS,
        summary="Send a message (Postmark)",
        openapi_extra=json_body(PostmarkEmail),
    )
    async def email(request: Request) -> JSONResponse:
        """Postmark's single send: the message is stored and queued like a native one."""
        try:
            app_id = await _caller(request)
            data = await _json(request)
            return JSONResponse(await send_one(request, app_id, data))
        except PostmarkError as exc:
            return exc.response()

    @router.post(
        "/email/batch",
        response_model=list[PostmarkSent],
        responses=_ERRORS,
        summary="Send up to 500 messages (Postmark)",
        openapi_extra=json_body(PostmarkEmail, array=True),
    )
    async def batch(request: Request) -> JSONResponse:
        """Each message is accepted or refused on its own; the answer lists each result in
        order (200 even when some were refused, as Postmark does)."""
        try:
            app_id = await _caller(request)
            data = await _json(request)
            if not isinstance(data, list):
                raise PostmarkError(422, INVALID_JSON, "The batch body must be a JSON array.")
            return JSONResponse(await _send_each(request, app_id, data, templated=False))
        except PostmarkError as exc:
            return exc.response()

    @router.post(
        "/email/withTemplate",
        response_model=PostmarkSent,
        responses=_ERRORS,
        summary="Send a message made from a template (Postmark)",
    )
    @router.post("/email/withTemplate/", include_in_schema=False)
    async def with_template(request: Request) -> JSONResponse:
        """`TemplateAlias` (or `TemplateId`) names a Postbode template, rendered with
        `TemplateModel`; the other fields are /email's, without Subject and bodies."""
        try:
            app_id = await _caller(request)
            data = await _json(request)
            return JSONResponse(await send_one(request, app_id, data, templated=True))
        except PostmarkError as exc:
            return exc.response()

    @router.post(
        "/email/batchWithTemplates",
        response_model=list[PostmarkSent],
        responses=_ERRORS,
        summary="Send up to 500 messages made from templates (Postmark)",
    )
    @router.post("/email/batchWithTemplates/", include_in_schema=False)
    async def batch_with_templates(request: Request) -> JSONResponse:
        """`{"Messages": [...]}`, each as /email/withTemplate takes it, each answered in
        order."""
        try:
            app_id = await _caller(request)
            data = await _json(request)
            items = data.get("Messages") if isinstance(data, dict) else None
            if not isinstance(items, list):
                raise PostmarkError(422, INVALID_JSON, "Give the messages as 'Messages': [...].")
            return JSONResponse(await _send_each(request, app_id, items, templated=True))
        except PostmarkError as exc:
            return exc.response()


router = APIRouter(prefix="/compat/postmark", tags=["compat: postmark"])
_routes(router)

root_router = APIRouter(tags=["compat: postmark"], dependencies=[Depends(_root_only_with_token)])
"""The same paths at the root, answered only for requests with X-Postmark-Server-Token."""
_routes(root_router)
