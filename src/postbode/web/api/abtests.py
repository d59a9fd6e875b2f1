"""A/B tests over HTTP: /api/v1/ab-tests (create, list, one with its figures and verdict,
end)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from postbode.store.engine import Store
from postbode.templates import abtest
from postbode.templates.manage import TemplateError
from postbode.templates.render import MAX_SOURCE
from postbode.web.api.fields import ApiInput
from postbode.web.api.templates import api_error
from postbode.web.auth import ApiApp

T = TypeVar("T")

router = APIRouter(prefix="/api/v1/ab-tests", tags=["templates"])

TestId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _unicode(value: str | None) -> str | None:
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text") from None
    return value


class VariantIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")
    subject: Annotated[str | None, AfterValidator(_unicode)] = Field(
        None, max_length=10_000, description="Absent: the template's"
    )
    html: Annotated[str | None, AfterValidator(_unicode)] = Field(None, max_length=MAX_SOURCE)
    text: Annotated[str | None, AfterValidator(_unicode)] = Field(None, max_length=MAX_SOURCE)
    weight: int = Field(1, ge=1, le=1000, description="Share of the recipients, relative")


class AbTestIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(min_length=1, max_length=100, description="The template's alias")
    name: Annotated[str, AfterValidator(_unicode)] = Field("", max_length=200)
    variants: list[VariantIn] = Field(min_length=2, max_length=abtest.MAX_VARIANTS)


class EndIn(ApiInput):
    model_config = ConfigDict(extra="forbid")

    winner: str | None = Field(
        None, max_length=64, description="Absent: the verdict's winner (409 if there is none)"
    )


class VariantOut(BaseModel):
    name: str
    weight: int
    subject: str | None
    html: str | None
    text: str | None
    sent: int
    delivered: int
    opened: int = Field(description="Deliveries opened by a person (bots' opens not counted)")
    clicked: int = Field(description="Deliveries with a link clicked by a person")
    unsubscribed: int
    open_rate: float | None = Field(description="opened / delivered")
    click_rate: float | None


class VerdictOut(BaseModel):
    text: str = Field(
        description="e.g. `B's open rate is higher, 95 % confidence, +4.1 "
        "points ±2.0`, or `keep testing (…)`"
    )
    decided: bool
    winner: str | None
    metric: str
    confidence: float
    min_sample: int = Field(description="Delivered messages per variant before any verdict")
    difference_points: float | None = Field(
        description="Best open rate minus the next best, in percentage points"
    )
    interval_points: list[float] | None = Field(description="Its confidence interval")
    p_value: float | None = Field(description="Two-proportion z-test, two-sided")


class AbTestOut(BaseModel):
    id: int
    template: str
    name: str
    status: str = Field(description="running | ended")
    winner: str | None
    created_at: datetime
    ended_at: datetime | None
    variants: list[VariantOut]
    verdict: VerdictOut


class AbTestList(BaseModel):
    data: list[AbTestOut] = Field(description="Newest first")


async def _call(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    store: Store = request.app.state.store
    try:
        return await run_in_threadpool(fn, store, *args, **kwargs)
    except TemplateError as exc:
        raise api_error(exc) from None


@router.post("", status_code=201, response_model=AbTestOut)
async def create_test(body: AbTestIn, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """Start a test of a template: from now on each send of it picks a variant by a stable
    hash of (test, recipient) against the weights, so a person always sees the same one. A
    variant's absent parts are the template's live version's."""
    return await _call(
        request,
        abtest.create_test,
        app_id,
        template=body.template,
        name=body.name,
        variants=[v.model_dump() for v in body.variants],
    )


@router.get("", response_model=AbTestList)
async def list_tests(request: Request, app_id: ApiApp) -> dict[str, Any]:
    return {"data": await _call(request, abtest.list_tests, app_id)}


@router.get("/{test_id}", response_model=AbTestOut)
async def get_test(test_id: TestId, request: Request, app_id: ApiApp) -> dict[str, Any]:
    """The test with its running figures per variant and the verdict."""
    return await _call(request, abtest.get_test, app_id, test_id)


@router.post("/{test_id}/end", response_model=AbTestOut)
async def end_test(
    test_id: TestId, body: EndIn, request: Request, app_id: ApiApp
) -> dict[str, Any]:
    """End the test: the winner becomes the template's live version (a new version)."""
    return await _call(request, abtest.end_test, app_id, test_id, body.winner)
