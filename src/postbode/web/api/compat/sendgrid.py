"""SendGrid's v3 mail send API under /compat/sendgrid/v3: `POST /mail/send` with a Bearer key,
202 and X-Message-Id, errors as `{"errors": [{"message", "field", "help"}]}`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from postbode.ingest.accept import Accepted
from postbode.web.api.compat import common
from postbode.web.api.compat.schema import json_body

MAX_PERSONALIZATIONS = 1000
HELP = None

# Native field -> SendGrid's name for it, for error messages.
FIELDS = {
    "from": "from.email",
    "reply_to": "reply_to.email",
    "subject": "subject",
    "text": "content",
    "html": "content",
    "headers": "headers",
    "attachments": "attachments",
    "tag": "categories",
    "metadata": "custom_args",
    "stream": "asm",
}
# What Postbode does not do (legacy substitutions, batches of scheduled sends, IP pools):
# refused, never ignored. `template_id` names a Postbode template by its alias, rendered with
# each personalization's `dynamic_template_data`; `send_at` (Unix time) schedules the send.
UNSUPPORTED_TOP = {
    "batch_id": "scheduled sending (batches) is not supported by this server yet",
    "ip_pool_name": "IP pools are not supported by this server",
    "sections": "substitution sections are not supported by this server yet",
}
UNSUPPORTED_PERSONALIZATION = {
    "substitutions": "substitutions are not supported by this server yet",
}
KNOWN_TOP = {
    "personalizations",
    "from",
    "reply_to",
    "reply_to_list",
    "subject",
    "content",
    "attachments",
    "headers",
    "categories",
    "custom_args",
    "asm",
    "mail_settings",
    "tracking_settings",
    "template_id",
    "send_at",
    *UNSUPPORTED_TOP,
}
KNOWN_PERSONALIZATION = {
    "to",
    "cc",
    "bcc",
    "subject",
    "headers",
    "custom_args",
    "from",
    "dynamic_template_data",
    "send_at",
    *UNSUPPORTED_PERSONALIZATION,
}


class SendGridError(Exception):
    """An answer in SendGrid's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body = {"errors": [{"message": self.message, "field": self.field, "help": HELP}]}
        return JSONResponse(
            body, status_code=self.status, headers=common.retry_headers(self.retry_after)
        )


# -- the request as SendGrid documents it (for the OpenAPI document) ---------------------------


class SgAddress(BaseModel):
    email: str
    name: str | None = None


class SgPersonalization(BaseModel):
    model_config = ConfigDict(extra="allow")

    to: list[SgAddress]
    cc: list[SgAddress] | None = None
    bcc: list[SgAddress] | None = None
    subject: str | None = None
    headers: dict[str, str] | None = None
    custom_args: dict[str, str] | None = None


class SgContent(BaseModel):
    type: str = Field(description="text/plain or text/html")
    value: str


class SgAttachment(BaseModel):
    content: str = Field(description="base64")
    filename: str
    type: str | None = None
    disposition: str | None = Field(None, description="attachment or inline")
    content_id: str | None = None


class SgMail(BaseModel):
    model_config = ConfigDict(extra="allow")

    personalizations: list[SgPersonalization]
    from_: SgAddress = Field(alias="from")
    reply_to: SgAddress | None = None
    subject: str | None = None
    content: list[SgContent] | None = None
    attachments: list[SgAttachment] | None = None
    headers: dict[str, str] | None = None
    categories: list[str] | None = Field(None, description="One category: the message's tag")
    custom_args: dict[str, str] | None = Field(None, description="The message's metadata")
    tracking_settings: dict[str, Any] | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request: `{errors: [{message, field, help}]}`"},
    401: {"description": "Bad or missing API key"},
    403: {"description": "The from address is not a domain of this app"},
}


# -- translation ------------------------------------------------------------------------------


def _address(value: Any, field: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("email"), str):
        raise SendGridError(400, "The email address is required.", f"{field}.email")
    name = value.get("name")
    return common.mailbox(value["email"], name if isinstance(name, str) else None)


def _addresses(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SendGridError(400, "Invalid type. Expected: array, given: object.", field)
    return [_address(v, f"{field}.{i}") for i, v in enumerate(value)]


def _object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SendGridError(400, "Invalid type. Expected: object.", field)
    return value


def _enabled(settings: dict[str, Any], name: str) -> bool | None:
    setting = settings.get(name)
    if isinstance(setting, dict) and "enable" in setting:
        return bool(setting["enable"])
    return None


def translate(data: Any) -> list[tuple[dict[str, Any], str]]:
    """One native send request per personalization (SendGrid sends each as its own message),
    each with the SendGrid path of its personalization; SendGridError for what SendGrid
    would refuse and for what Postbode does not support yet."""
    if not isinstance(data, dict):
        raise SendGridError(400, "Bad Request: the body must be a JSON object.")
    for name, why in UNSUPPORTED_TOP.items():
        if data.get(name) is not None:
            raise SendGridError(400, f"The {name} parameter is not supported: {why}.", name)
    unknown = sorted(set(data) - KNOWN_TOP)
    if unknown:
        raise SendGridError(400, f"The {unknown[0]} parameter is not supported.", unknown[0])
    personalizations = data.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        raise SendGridError(
            400,
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
    if len(personalizations) > MAX_PERSONALIZATIONS:
        raise SendGridError(
            400,
            f"The personalizations field may have at most {MAX_PERSONALIZATIONS} items.",
            "personalizations",
        )
    if "from" not in data:
        raise SendGridError(400, "The from object must be provided for every email send.", "from")
    common_body: dict[str, Any] = {"from": _address(data["from"], "from")}
    template = data.get("template_id")
    if template is not None:
        if not isinstance(template, str) or not template:
            raise SendGridError(400, "The template_id must be a string.", "template_id")
        if data.get("content"):
            raise SendGridError(400, "Give content or a template_id, not both.", "content")
        common_body["template"] = template
    if data.get("send_at") is not None:
        common_body["send_at"] = _send_at(data["send_at"], "send_at")
    reply_to = data.get("reply_to")
    if reply_to is not None:
        common_body["reply_to"] = _address(reply_to, "reply_to")
    elif data.get("reply_to_list"):
        replies = _addresses(data["reply_to_list"], "reply_to_list")
        if len(replies) > 1:
            raise SendGridError(
                400, "Only one reply_to address is supported by this server.", "reply_to_list"
            )
        common_body["reply_to"] = replies[0]
    for i, part in enumerate(data.get("content") or []):
        kind = part.get("type") if isinstance(part, dict) else None
        value = part.get("value") if isinstance(part, dict) else None
        if not isinstance(value, str):
            raise SendGridError(400, "The content value must be a string.", f"content.{i}.value")
        if kind == "text/plain":
            common_body["text"] = value
        elif kind == "text/html":
            common_body["html"] = value
        else:
            raise SendGridError(
                400,
                f"The content type {kind!r} is not supported: use text/plain or text/html.",
                f"content.{i}.type",
            )
    attachments = data.get("attachments")
    if attachments:
        if not isinstance(attachments, list):
            raise SendGridError(400, "Invalid type. Expected: array.", "attachments")
        common_body["attachments"] = [_attachment(a, i) for i, a in enumerate(attachments)]
    categories = data.get("categories")
    if categories:
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise SendGridError(400, "The categories must be an array of strings.", "categories")
        if len(categories) > 1:
            raise SendGridError(
                400,
                "Only one category per message is supported by this server (it is the "
                "message's tag).",
                "categories",
            )
        common_body["tag"] = categories[0]
    asm = _object(data.get("asm"), "asm")
    if asm:
        # Unsubscribe groups are for mail people subscribe to: Postbode's broadcast stream,
        # whose messages carry a one-click List-Unsubscribe.
        common_body["stream"] = "broadcast"
    mail_settings = _object(data.get("mail_settings"), "mail_settings")
    for name in mail_settings:
        if _enabled(mail_settings, name):
            raise SendGridError(
                400, f"The mail setting {name} is not supported by this server.", "mail_settings"
            )
    tracking = _object(data.get("tracking_settings"), "tracking_settings")
    opens, clicks = _enabled(tracking, "open_tracking"), _enabled(tracking, "click_tracking")
    if opens is not None:
        common_body["track_opens"] = opens
    if clicks is not None:
        common_body["track_clicks"] = clicks
    for name in ("subscription_tracking", "ganalytics"):
        if _enabled(tracking, name):
            raise SendGridError(
                400,
                f"The tracking setting {name} is not supported by this server.",
                f"tracking_settings.{name}",
            )
    top_headers = _object(data.get("headers"), "headers")
    top_args = _object(data.get("custom_args"), "custom_args")
    if asm.get("group_id") is not None:
        top_args = {**top_args, "asm_group_id": str(asm["group_id"])}
    out = []
    for i, p in enumerate(personalizations):
        where = f"personalizations.{i}"
        if not isinstance(p, dict):
            raise SendGridError(400, "Invalid type. Expected: object.", where)
        for name, why in UNSUPPORTED_PERSONALIZATION.items():
            if p.get(name) is not None:
                raise SendGridError(
                    400, f"The {name} parameter is not supported: {why}.", f"{where}.{name}"
                )
        unknown = sorted(set(p) - KNOWN_PERSONALIZATION)
        if unknown:
            raise SendGridError(
                400, f"The {unknown[0]} parameter is not supported.", f"{where}.{unknown[0]}"
            )
        body = dict(common_body)
        if p.get("from") is not None:
            body["from"] = _address(p["from"], f"{where}.from")
        to = _addresses(p.get("to"), f"{where}.to")
        if not to:
            raise SendGridError(
                400,
                "The to array is required for all personalization objects, and must have at "
                "least one email object with a valid email address.",
                f"{where}.to",
            )
        body["to"] = to
        for name in ("cc", "bcc"):
            found = _addresses(p.get(name), f"{where}.{name}")
            if found:
                body[name] = found
        subject = p.get("subject", data.get("subject"))
        if subject is not None and template is None:  # a template's subject is its own
            body["subject"] = subject
        if template is not None:
            body["model"] = _object(
                p.get("dynamic_template_data"), f"{where}.dynamic_template_data"
            )
        elif p.get("dynamic_template_data") is not None:
            raise SendGridError(
                400,
                "dynamic_template_data needs a template_id.",
                f"{where}.dynamic_template_data",
            )
        if p.get("send_at") is not None:
            body["send_at"] = _send_at(p["send_at"], f"{where}.send_at")
        headers = {**top_headers, **_object(p.get("headers"), f"{where}.headers")}
        if headers:
            body["headers"] = headers
        args = {**top_args, **_object(p.get("custom_args"), f"{where}.custom_args")}
        if args:
            body["metadata"] = args
        out.append((body, where))
    return out


def _send_at(value: Any, field: str) -> str:
    """SendGrid's send_at (Unix seconds) as the RFC 3339 time the native API takes."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**37:
        raise SendGridError(400, "The send_at must be a Unix timestamp (seconds).", field)
    return datetime.fromtimestamp(value, UTC).isoformat()


def _attachment(item: Any, i: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise SendGridError(400, "Invalid type. Expected: object.", f"attachments.{i}")
    out: dict[str, Any] = {"filename": item.get("filename"), "content": item.get("content")}
    if item.get("type"):
        out["content_type"] = item["type"]
    if item.get("disposition") == "inline":
        if not item.get("content_id"):
            raise SendGridError(
                400,
                "The content_id parameter is required if the disposition is set to inline.",
                f"attachments.{i}.content_id",
            )
        out["content_id"] = item["content_id"]
    return out


def _field(exc: common.Refusal, where: str) -> str | None:
    head, index, rest = common.native_field(exc.field)
    if head in ("to", "cc", "bcc"):
        return f"{where}.{head}" + (f".{index}.email" if index is not None else "")
    if head in ("subject", "headers", "metadata"):
        name = {"metadata": "custom_args"}.get(head, head)
        return f"{where}.{name}" if head != "subject" else "subject"
    if head == "attachments" and index is not None:
        return f"attachments.{index}" + (f".{rest}" if rest else "")
    return FIELDS.get(head, head or None)


def refusal(exc: common.Refusal, where: str) -> SendGridError:
    if exc.code == "foreign_domain":
        return SendGridError(
            403,
            "The from address does not match a verified Sender Identity. Mail cannot be sent "
            "until this error is resolved: " + exc.message,
            "from",
        )
    if exc.code == "app_suspended":
        return SendGridError(403, "Forbidden: the app is suspended.")
    if exc.status in (413, 429) or exc.status >= 500:
        return SendGridError(exc.status, exc.message, retry_after=exc.retry_after)
    return SendGridError(400, exc.message, _field(exc, where))


# -- the route ------------------------------------------------------------------------------


async def _caller(request: Request) -> int:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise SendGridError(
            401, "Permission denied, wrong credentials: send Authorization: Bearer <key>."
        )
    app_id = await common.app_for_key(request, key)
    if app_id is None:
        raise SendGridError(401, "The provided authorization grant is invalid, expired, or revoked")
    return app_id


router = APIRouter(prefix="/compat/sendgrid/v3", tags=["compat: sendgrid"])


@router.post(
    "/mail/send",
    status_code=202,
    responses={202: {"description": "Accepted; the X-Message-Id header names it"}, **_ERRORS},
    summary="Send mail (SendGrid v3)",
    openapi_extra=json_body(SgMail),
)
async def mail_send(request: Request) -> Response:
    """SendGrid's v3 send. Each personalization becomes a message of its own (as SendGrid
    sends it); X-Message-Id names the first. All are checked before any is stored."""
    try:
        app_id = await _caller(request)
        try:
            raw = await common.read_body(request)
        except common.TooLarge as exc:
            raise SendGridError(413, str(exc)) from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise SendGridError(400, "Bad Request: the body is not valid JSON.") from None
        bodies = translate(data)
        checked = []
        for body, where in bodies:
            try:
                checked.append((common.validate(body), where))
            except common.Refusal as exc:
                raise refusal(exc, where) from None
        accepted: list[Accepted] = []
        for request_body, where in checked:
            try:
                accepted.append(await common.accept(request, app_id, request_body))
            except common.Refusal as exc:
                raise refusal(exc, where) from None
    except SendGridError as exc:
        return exc.response()
    return Response(status_code=202, headers={"X-Message-Id": str(accepted[0].id)})
