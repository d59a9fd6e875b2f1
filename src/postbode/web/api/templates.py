"""Templates over HTTP: /api/v1/templates (by alias), their versions, the live one, and
validation with a test model."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.store.engine import Store
from postbode.templates import manage
from postbode.templates.render import MAX_SOURCE
from postbode.web.api.fields import ApiInput
from postbode.web.auth import ApiApp
from postbode.web.errors import ApiError

T = TypeVar("T")
MAX_MODEL_KEYS = 1000

router = APIRouter(prefix="/api/v1/templates", tags=["templates"])

Alias = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


def _unicode(value: str) -> str:
    # PostgreSQL text holds no lone surrogates (JSON "\ud800"): they are no Unicode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


Part = Annotated[str, Field(max_length=MAX_SOURCE), AfterValidator(_unicode)]
Line = Annotated[str, Field(max_length=10_000), AfterValidator(_unicode)]
Name = Annotated[str, Field(max_length=200), AfterValidator(_unicode)]


class TemplateIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(max_length=100, description="The name sends use: letters, digits, _ . -")
    name: Name = ""
    subject: Annotated[Line, Field(min_length=1)]
    html: Part | None = Field(None, description="Jinja2; model values are HTML-escaped")
    text: Part | None = Field(None, description="Jinja2; made from the HTML when absent")
    layout: str | None = Field(
        None,
        max_length=100,
        description="The alias of a template this one renders inside, as `{{ content }}`",
    )


class VersionIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    subject: Annotated[Line, Field(min_length=1)]
    html: Part | None = None
    text: Part | None = None
    layout: str | None = Field(None, max_length=100)
    live: bool = Field(False, description="Make the new version live at once")


class LiveIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)


class ValidateIn(ApiInput):
    """Parts to check; none given: the template's live version."""

    model_config = ConfigDict(extra="forbid")

    subject: Line | None = None
    html: Part | None = None
    text: Part | None = None
    layout: str | None = Field(None, max_length=100)
    model: dict[str, Any] | None = Field(
        None, max_length=MAX_MODEL_KEYS, description="A test model: the answer has the rendering"
    )


class VersionSummary(BaseModel):
    version: int
    created_at: datetime
    live: bool


class TemplateOut(BaseModel):
    id: int = Field(description="Postmark's TemplateId names the template by this")
    alias: str
    name: str
    live_version: int | None
    latest_version: int | None
    subject: str = Field(description="Of the live version (or the latest, if none is live)")
    html: str | None
    text: str | None
    layout: str | None
    versions: list[VersionSummary] = Field(description="Newest first")
    created_at: datetime
    updated_at: datetime


class TemplateSummary(BaseModel):
    id: int
    alias: str
    name: str
    live_version: int | None
    created_at: datetime
    updated_at: datetime


class TemplateList(BaseModel):
    data: list[TemplateSummary]


class VersionOut(BaseModel):
    alias: str
    version: int
    subject: str
    html: str | None
    text: str | None
    layout: str | None
    created_at: datetime


class ProblemOut(BaseModel):
    part: str = Field(description="subject, html, text, layout.html or layout.text")
    line: int | None
    message: str


class RenderedOut(BaseModel):
    subject: str
    html: str | None
    text: str


class ValidationOut(BaseModel):
    valid: bool
    errors: list[ProblemOut]
    rendered: RenderedOut | None = None


def api_error(exc: manage.TemplateError) -> ApiError:
    """The JSON error of a template error; syntax and rendering errors list every problem
    with its part and line under `error.errors`."""
    error = ApiError(exc.status, exc.code, exc.message, exc.field)
    if exc.errors:
        error.body["error"]["errors"] = exc.errors
    return error


async def _call(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    store: Store = request.app.state.store
    try:
        return await run_in_threadpool(fn, store, *args, **kwargs)
    except manage.TemplateError as exc:
        raise api_error(exc) from None


@router.post("", status_code=201, response_model=TemplateOut)
async def create_template(body: TemplateIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """A new template; its first version is live. Syntax errors are 422 with each one's part
    and line under `error.errors`."""
    return await _call(
        request,
        manage.create_template,
        app_id,
        body.alias,
        subject=body.subject,
        html=body.html,
        text=body.text,
        layout=body.layout,
        name=body.name,
    )


@router.get("", response_model=TemplateList)
async def list_templates(request: Request, app_id: ApiApp) -> dict[str, Any]:
    return {"data": await _call(request, manage.list_templates, app_id)}


@router.get("/{alias}", response_model=TemplateOut)
async def get_template(alias: Alias, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """The template with its live version's parts and its versions, newest first."""
    return await _call(request, manage.get_template, app_id, alias)


@router.put("/{alias}", response_model=TemplateOut)
async def update_template(
    alias: Alias, body: VersionIn, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    """A new version. It is live only with `live: true`; else choose it with
    `POST /api/v1/templates/{alias}/live`."""
    return await _call(
        request,
        manage.update_template,
        app_id,
        alias,
        subject=body.subject,
        html=body.html,
        text=body.text,
        layout=body.layout,
        name=body.name,
        live=body.live,
    )


@router.post("/{alias}/live", response_model=TemplateOut)
async def set_live(alias: Alias, body: LiveIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Choose the version sends render."""
    return await _call(request, manage.set_live, app_id, alias, body.version)


@router.get("/{alias}/versions/{version}", response_model=VersionOut)
async def get_version(
    alias: Alias,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    request: Request,
    app_id: ApiApp,
) -> dict[str, Any]:
    return await _call(request, manage.get_version, app_id, alias, version)


@router.delete("/{alias}", status_code=204)
async def delete_template(alias: Alias, request: Request, app_id: ApiApp) -> Response:
    await _call(request, manage.delete_template, app_id, alias)
    return Response(status_code=204)


@router.post("/{alias}/validate", response_model=ValidationOut)
async def validate_template(
    alias: Alias, body: ValidateIn, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    """Check parts (or, with none given, the template's live version): `valid`, and each
    error with its part and line. With a `model`, the rendering as a send would make it."""
    return await _call(
        request,
        manage.validate,
        app_id,
        alias=alias,
        subject=body.subject,
        html=body.html,
        text=body.text,
        layout=body.layout,
        model=body.model,
    )
