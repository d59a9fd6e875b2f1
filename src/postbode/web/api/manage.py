"""The management API under /api/v1, for an organisation's admins: apps (settings, suspension),
credentials, sending domains (DNS records, checks, DKIM rotation), webhooks, users and roles,
organisation tokens and the audit log. Authenticated by an organisation token (`pbo_…`); an
app's API key can never manage anything. Every change is written to the audit log."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from postbode import audit, dnscheck, tenancy
from postbode.abuse import alerts as abuse_alerts
from postbode.abuse import hold as abuse_hold
from postbode.abuse import limits as abuse_limits
from postbode.abuse import release as abuse_release
from postbode.abuse.figures import app_figures
from postbode.config import Settings
from postbode.endpoints.destinations import MAX_URL_LENGTH, DestinationPolicy
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, audit_log, domains, organizations
from postbode.web.api.webhooks import (
    RotatedSecret,
    WebhookCreated,
    WebhookFormat,
    WebhookList,
    WebhookOut,
)
from postbode.web.errors import ApiError
from postbode.webhooks import manage as hooks

T = TypeVar("T")
AUDIT_PAGE = 50
# Row ids are 32-bit integers on PostgreSQL: a larger one names nothing (404, not a 500).
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid organisation token"},
    403: {"description": "An app's API key was given: it cannot manage anything"},
    404: {"description": "Not in this organization"},
    422: {"description": "Invalid request, the field named"},
}


# -- who is calling -----------------------------------------------------------------------------


async def org_token(request: Request) -> tenancy.OrgToken:
    """The organisation token in `Authorization: Bearer pbo_…`; 401 without one, 403 for an
    app's API key."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <organisation token>")
    if token.startswith(tenancy.API_KEY_PREFIX):
        raise ApiError(
            403,
            "forbidden",
            "an app's API key cannot manage anything: use an organisation token "
            "(`postbode token create`)",
        )
    store: Store = request.app.state.store
    found = await run_in_threadpool(tenancy.authenticate_org_token, store, token)
    if found is None:
        raise ApiError(401, "unauthorized", "invalid or revoked organisation token")
    return found


_TOKEN_KEY = "postbode.org_token"  # noqa: S105 (a scope key: where the checked token is kept)


async def _checked_token(request: Request) -> tenancy.OrgToken:
    """`org_token`, checked once per request."""
    known = request.scope.get(_TOKEN_KEY)
    if isinstance(known, tenancy.OrgToken):
        return known
    found = await org_token(request)
    request.scope[_TOKEN_KEY] = found
    return found


class OrgRoute(APIRoute):
    """A management route whose caller is authenticated before its body is read (FastAPI
    parses a body before it solves dependencies: a stranger's body would be read first)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                try:
                    await _checked_token(request)
                except ApiError as exc:
                    return JSONResponse(exc.body, status_code=exc.status)
            return await handler(request)

        return handle


Caller = Annotated[tenancy.OrgToken, Depends(_checked_token)]

router = APIRouter(prefix="/api/v1", tags=["management"], responses=_ERRORS, route_class=OrgRoute)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _ip(request: Request) -> str | None:
    client = request.scope.get("client")
    return client[0] if client else None


def _status(exc: tenancy.TenancyError) -> int:
    text = str(exc)
    if text.startswith("no "):
        return 404
    if "already" in text:
        return 409
    return 422


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A store function off the event loop; its refusals become the JSON error shape."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except tenancy.TenancyError as exc:
        raise ApiError(_status(exc), _code(exc), str(exc)) from None
    except hooks.WebhookError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None


def _code(exc: tenancy.TenancyError) -> str:
    return {404: "not_found", 409: "conflict"}.get(_status(exc), "invalid")


def _audit(
    request: Request,
    caller: tenancy.OrgToken,
    action: str,
    target: str,
    data: dict[str, Any] | None = None,
) -> None:
    with _store(request).write() as conn:
        audit.write(
            conn,
            caller.organization_id,
            caller.actor,
            action,
            target,
            data,
            ip=_ip(request),
        )


def _org_name(store: Store, organization_id: int) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                select(organizations.c.name).where(organizations.c.id == organization_id)
            ).scalar_one()
        )


def _app(store: Store, caller: tenancy.OrgToken, name: str) -> dict[str, Any]:
    """The caller's app called `name`; 404 for an app of another organization too."""
    with store.read() as conn:
        row = (
            conn.execute(
                select(apps).where(
                    apps.c.name == name, apps.c.organization_id == caller.organization_id
                )
            )
            .mappings()
            .first()
        )
    if row is None:
        raise ApiError(404, "not_found", f"no app named {name!r}", "app")
    return dict(row)


async def _app_of(request: Request, caller: tenancy.OrgToken, name: str) -> dict[str, Any]:
    return await run_in_threadpool(_app, _store(request), caller, name)


# -- apps ---------------------------------------------------------------------------------------


class AppOut(BaseModel):
    id: int
    name: str
    status: Literal["active", "suspended"]
    track_opens: bool
    track_clicks: bool
    max_message_age_seconds: int | None = Field(description="null: the global setting")
    raw_retention_days: int
    metadata_retention_days: int
    hold_reason: str | None = Field(
        description="Set while the app is held: its new mail is accepted as held, its queued "
        "mail waits, until released"
    )
    held_at: datetime | None
    held_by: str | None = Field(description="Who held it: a person, a token, or postbode")
    created_at: datetime


class AppList(BaseModel):
    data: list[AppOut]


class AppIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9_-]+$")


class AppCreated(BaseModel):
    app: str
    api_key: str = Field(description="Shown this once")
    smtp_username: str
    smtp_password: str = Field(description="Shown this once")


# A null maximum message age means the installation's setting; nothing else may be null.
NULLABLE_APP_SETTINGS = frozenset({"max_message_age_seconds"})


class AppPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    track_opens: bool | None = None
    track_clicks: bool | None = None
    max_message_age_seconds: int | None = Field(None, ge=60, le=30 * 86400)
    raw_retention_days: int | None = Field(None, ge=0, le=3650)
    metadata_retention_days: int | None = Field(None, ge=0, le=3650)
    status: Literal["active", "suspended"] | None = Field(
        None, description="suspended: nothing is accepted or delivered"
    )


def _app_out(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in AppOut.model_fields}


@router.get("/apps", response_model=AppList, summary="List the organization's apps")
async def list_apps(request: Request, caller: Caller) -> dict[str, Any]:
    def load() -> list[dict[str, Any]]:
        with _store(request).read() as conn:
            rows = conn.execute(
                select(apps)
                .where(apps.c.organization_id == caller.organization_id)
                .order_by(apps.c.name)
            ).mappings()
            return [_app_out(dict(r)) for r in rows]

    return {"data": await run_in_threadpool(load)}


@router.post("/apps", status_code=201, response_model=AppCreated, summary="Create an app")
async def create_app(body: AppIn, request: Request, caller: Caller) -> dict[str, str]:
    """An app with one API key and one SMTP login: their secrets are in this answer only."""
    store = _store(request)
    org = await run_in_threadpool(_org_name, store, caller.organization_id)
    created = await _call(tenancy.create_app, store, body.name, org)
    _audit(request, caller, "app.create", body.name)
    return created.as_contract()


@router.get("/apps/{app}", response_model=AppOut, summary="An app and its settings")
async def get_app(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    return _app_out(await _app_of(request, caller, app))


@router.patch("/apps/{app}", response_model=AppOut, summary="Change an app's settings")
async def update_app(app: str, body: AppPatch, request: Request, caller: Caller) -> dict[str, Any]:
    """Tracking defaults, maximum message age, retention, and status (suspend / resume)."""
    await _app_of(request, caller, app)
    changes = body.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is None and name not in NULLABLE_APP_SETTINGS:
            raise ApiError(422, "invalid", f"{name} cannot be null", name)
    after, changed = await _call(
        tenancy.update_app,
        _store(request),
        app,
        organization=caller.organization_id,
        **changes,
    )
    if changed:
        _audit(request, caller, "app.settings", app, {"changed": changed})
    return _app_out(after)


async def _set_status(request: Request, caller: tenancy.OrgToken, app: str, status: str) -> Any:
    await _app_of(request, caller, app)
    after, changed = await _call(
        tenancy.update_app,
        _store(request),
        app,
        organization=caller.organization_id,
        status=status,
    )
    if changed:
        action = "app.suspend" if status == "suspended" else "app.resume"
        _audit(request, caller, action, app)
    return _app_out(after)


@router.post("/apps/{app}/suspend", response_model=AppOut, summary="Suspend an app")
async def suspend_app(app: str, request: Request, caller: Caller) -> Any:
    """Nothing more is accepted from the app, and its queued mail is held, until it resumes."""
    return await _set_status(request, caller, app, "suspended")


@router.post("/apps/{app}/resume", response_model=AppOut, summary="Resume a suspended app")
async def resume_app(app: str, request: Request, caller: Caller) -> Any:
    return await _set_status(request, caller, app, "active")


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="Shown with each held delivery")


class Released(AppOut):
    released: int = Field(description="Held deliveries put back in the queue")


def _actor(request: Request, caller: tenancy.OrgToken) -> abuse_hold.Actor:
    return abuse_hold.Actor(caller.actor, ip=_ip(request))


@router.post("/apps/{app}/hold", response_model=AppOut, summary="Hold an app's mail")
async def hold_app(app: str, body: HoldIn, request: Request, caller: Caller) -> Any:
    """New mail is accepted with status `held` and the reason; queued mail is not sent; both
    wait until the app is released (or the held deliveries are cancelled in the queue)."""
    row = await _app_of(request, caller, app)
    if not body.reason.strip():
        raise ApiError(422, "invalid", "give a reason for the hold", "reason")
    await run_in_threadpool(
        abuse_hold.hold, _store(request), row["id"], body.reason, _actor(request, caller)
    )
    return _app_out(await _app_of(request, caller, app))


@router.post("/apps/{app}/release", response_model=Released, summary="Release a held app")
async def release_app(app: str, request: Request, caller: Caller) -> Any:
    """End the hold; the app's held mail is queued and goes out."""
    row = await _app_of(request, caller, app)
    released = await run_in_threadpool(
        abuse_release.release, _store(request), row["id"], _actor(request, caller)
    )
    return {**_app_out(await _app_of(request, caller, app)), "released": released}


LimitValue = Annotated[int | None, Field(ge=0, le=2**31 - 1)]


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_minute: LimitValue = Field(None, description="Messages per minute; null or 0: no limit")
    per_hour: LimitValue = Field(None, description="Messages per hour; null or 0: no limit")
    per_day: LimitValue = Field(None, description="Messages per day; null or 0: no limit")


class LimitsOut(BaseModel):
    app: str
    credential_id: int | None = Field(description="null: the app's own limits")
    per_minute: int | None
    per_hour: int | None
    per_day: int | None


async def _limits(
    request: Request,
    caller: tenancy.OrgToken,
    app: str,
    credential_id: int | None,
    body: LimitsIn | None,
) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    changes = body.model_dump(exclude_unset=True) if body is not None else {}

    def run() -> abuse_limits.Limits:
        with _store(request).write() as conn:
            after = abuse_limits.set_limits(conn, row["id"], changes, credential_id)
            if changes:
                target = app if credential_id is None else f"{app} credential {credential_id}"
                audit.write(
                    conn,
                    caller.organization_id,
                    caller.actor,
                    "app.limits",
                    target,
                    after.as_json(),
                    ip=_ip(request),
                )
            return after

    try:
        after = await run_in_threadpool(run)
    except LookupError:
        raise ApiError(
            404, "not_found", f"no credential {credential_id}", "credential_id"
        ) from None
    return {"app": app, "credential_id": credential_id, **after.as_json()}


@router.get("/apps/{app}/limits", response_model=LimitsOut, summary="An app's sending limits")
async def get_app_limits(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    return await _limits(request, caller, app, None, None)


@router.patch("/apps/{app}/limits", response_model=LimitsOut, summary="Set sending limits")
async def set_app_limits(
    app: str, body: LimitsIn, request: Request, caller: Caller
) -> dict[str, Any]:
    """Messages accepted per minute, hour and day (fixed windows in UTC, counted across every
    node); over one, SMTP answers 451 4.7.1 and the API 429 with Retry-After. Fields left out
    stay as they are; null or 0 removes a limit."""
    return await _limits(request, caller, app, None, body)


@router.get(
    "/apps/{app}/credentials/{credential_id}/limits",
    response_model=LimitsOut,
    summary="A credential's sending limits",
)
async def get_credential_limits(
    app: str, credential_id: RowId, request: Request, caller: Caller
) -> dict[str, Any]:
    return await _limits(request, caller, app, credential_id, None)


@router.patch(
    "/apps/{app}/credentials/{credential_id}/limits",
    response_model=LimitsOut,
    summary="Set a credential's sending limits",
)
async def set_credential_limits(
    app: str, credential_id: RowId, body: LimitsIn, request: Request, caller: Caller
) -> dict[str, Any]:
    """As the app's limits, for mail sent with this one API key or SMTP login; both the
    app's and the credential's limits apply."""
    return await _limits(request, caller, app, credential_id, body)


@router.get("/apps/{app}/abuse", summary="What the abuse detectors see of an app")
async def app_abuse_figures(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    """The rate over the last minute against the baseline for this hour of the week and the
    spike threshold (null: not judged), and the hard-bounce and complaint rates against their
    thresholds (docs/abuse.md), with the app's hold."""
    row = await _app_of(request, caller, app)
    settings: Settings = request.app.state.settings

    def load() -> dict[str, Any]:
        with _store(request).read() as conn:
            return app_figures(conn, [row["id"]], settings)[row["id"]]

    figures = await run_in_threadpool(load)
    return {"app": app, "hold_reason": row["hold_reason"], **figures}


class AlertOut(BaseModel):
    id: int
    app: str
    kind: str = Field(description="limit, spike, bounce_rate, complaint_rate, content …")
    figures: dict[str, Any] = Field(description="The figures that tripped it")
    held: bool = Field(description="Whether the app's new mail was held because of it")
    created_at: datetime


class AlertList(BaseModel):
    data: list[AlertOut]


@router.get("/alerts", response_model=AlertList, summary="The organisation's latest alerts")
async def list_alerts(
    request: Request,
    caller: Caller,
    app: Annotated[str | None, Query(max_length=100, description="Only this app's")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    app_id = (await _app_of(request, caller, app))["id"] if app is not None else None

    def load() -> list[dict[str, Any]]:
        with _store(request).read() as conn:
            return abuse_alerts.recent(conn, caller.organization_id, app_id=app_id, limit=limit)

    rows = await run_in_threadpool(load)
    return {"data": [{k: r[k] for k in AlertOut.model_fields} for r in rows]}


# -- credentials --------------------------------------------------------------------------------


class CredentialOut(BaseModel):
    id: int
    kind: Literal["api", "smtp"]
    name: str
    lookup: str = Field(description="An API key's public prefix, or the SMTP username")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class CredentialList(BaseModel):
    data: list[CredentialOut]


class CredentialIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["api", "smtp"] = "api"
    name: str = Field("", max_length=100, description="A label, e.g. where it is used")


class CredentialCreated(BaseModel):
    id: int
    app: str
    kind: str
    name: str
    api_key: str | None = Field(None, description="Shown this once")
    smtp_username: str | None = None
    smtp_password: str | None = Field(None, description="Shown this once")


@router.get(
    "/apps/{app}/credentials", response_model=CredentialList, summary="An app's credentials"
)
async def list_credentials(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    """API keys and SMTP logins, never their secrets."""
    await _app_of(request, caller, app)
    return {
        "data": await _call(
            tenancy.list_credentials, _store(request), app, organization=caller.organization_id
        )
    }


@router.post(
    "/apps/{app}/credentials",
    status_code=201,
    response_model=CredentialCreated,
    summary="Create an API key or SMTP login",
)
async def create_credential(
    app: str, body: CredentialIn, request: Request, caller: Caller
) -> dict[str, Any]:
    """Its secret is in this answer and nowhere else."""
    await _app_of(request, caller, app)
    created = await _call(
        tenancy.create_credential,
        _store(request),
        app,
        body.kind,
        body.name,
        organization=caller.organization_id,
    )
    _audit(
        request,
        caller,
        "credential.create",
        app,
        {"id": created["id"], "kind": body.kind, "name": body.name},
    )
    return created


@router.delete(
    "/apps/{app}/credentials/{credential_id}", status_code=204, summary="Revoke a credential"
)
async def revoke_credential(
    app: str, credential_id: RowId, request: Request, caller: Caller
) -> Response:
    """It stops working at once in this process and within seconds in others."""
    row = await _app_of(request, caller, app)
    await _call(tenancy.revoke_credential, _store(request), credential_id, row["id"])
    _audit(request, caller, "credential.revoke", app, {"id": credential_id})
    return Response(status_code=204)


# -- domains ------------------------------------------------------------------------------------


class DnsRecord(BaseModel):
    purpose: str = Field(
        description="inbound (MX, for --inbound domains), spf, dkim, dkim_previous (during a "
        "rotation), return_path, return_path_mx (the return-path domain's MX), dmarc"
    )
    type: str
    name: str
    value: str


class DomainOut(BaseModel):
    name: str
    app: str
    dkim_selector: str
    previous_dkim_selector: str | None
    previous_dkim_until: datetime | None = Field(
        description="Until then the previous key stays published beside the new one"
    )
    verified_at: datetime | None
    dns_status: dict[str, str]
    dns_checked_at: datetime | None
    inbound: bool = Field(description="Takes mail for the app's inbound routes")
    records: list[DnsRecord] = Field(description="What to publish in DNS")


class DomainList(BaseModel):
    data: list[DomainOut]


class DomainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=3, max_length=253)
    inbound: bool = Field(False, description="It also takes mail for the app's routes")


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_days: float = Field(
        tenancy.DKIM_GRACE_DAYS,
        ge=0,
        le=90,
        description="How long the previous key stays published",
    )


class RecordCheckOut(BaseModel):
    purpose: str
    type: str
    name: str
    expected: str
    status: Literal["pass", "missing", "wrong"]
    found: list[str]
    detail: str
    error: str | None


class DomainCheckOut(BaseModel):
    domain: str
    checked_at: datetime
    verified: bool
    verified_at: datetime | None
    changed: bool
    records: list[RecordCheckOut]


def _domain_out(request: Request, row: dict[str, Any], app: str) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    until = row["previous_dkim_until"]
    return {
        "name": row["name"],
        "app": app,
        "dkim_selector": row["dkim_selector"],
        "previous_dkim_selector": row["previous_dkim_selector"] if until else None,
        "previous_dkim_until": until,
        "verified_at": row["verified_at"],
        "dns_status": dict(row["dns_status"] or {}),
        "dns_checked_at": row["dns_checked_at"],
        "inbound": bool(row["inbound"]),
        "records": (tenancy.inbound_records(row, settings.smtp_hostname) if row["inbound"] else [])
        + tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain),
    }


def _domains_of(store: Store, organization_id: int, app_id: int | None = None) -> list[Any]:
    query = (
        select(domains, apps.c.name.label("app_name"))
        .join(apps, apps.c.id == domains.c.app_id)
        .where(apps.c.organization_id == organization_id)
        .order_by(domains.c.name)
    )
    if app_id is not None:
        query = query.where(apps.c.id == app_id)
    with store.read() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


async def _domain(request: Request, caller: tenancy.OrgToken, app: str, name: str) -> Any:
    row = await _app_of(request, caller, app)
    wanted = name.strip().rstrip(".").lower()
    for found in await run_in_threadpool(
        _domains_of, _store(request), caller.organization_id, row["id"]
    ):
        if found["name"] == wanted:
            return found
    raise ApiError(404, "not_found", f"no domain {name!r} in app {app!r}", "domain")


@router.get("/domains", response_model=DomainList, summary="Every sending domain of the org")
async def list_all_domains(request: Request, caller: Caller) -> dict[str, Any]:
    rows = await run_in_threadpool(_domains_of, _store(request), caller.organization_id)
    return {"data": [_domain_out(request, r, r["app_name"]) for r in rows]}


@router.get("/apps/{app}/domains", response_model=DomainList, summary="An app's domains")
async def list_domains(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    found = await run_in_threadpool(_domains_of, _store(request), caller.organization_id, row["id"])
    return {"data": [_domain_out(request, r, app) for r in found]}


@router.post(
    "/apps/{app}/domains",
    status_code=201,
    response_model=DomainOut,
    summary="Add a sending domain",
)
async def add_domain(app: str, body: DomainIn, request: Request, caller: Caller) -> dict[str, Any]:
    """A new domain with its own 2048-bit DKIM key; the answer lists the records to publish."""
    await _app_of(request, caller, app)
    row = await _call(
        tenancy.add_domain,
        _store(request),
        app,
        body.name,
        inbound=body.inbound,
        organization=caller.organization_id,
    )
    _audit(request, caller, "domain.add", row["name"], {"app": app, "inbound": body.inbound})
    return _domain_out(request, row, app)


@router.get(
    "/apps/{app}/domains/{domain}", response_model=DomainOut, summary="A domain and its records"
)
async def get_domain(app: str, domain: str, request: Request, caller: Caller) -> dict[str, Any]:
    return _domain_out(request, await _domain(request, caller, app, domain), app)


@router.post(
    "/apps/{app}/domains/{domain}/check",
    response_model=DomainCheckOut,
    summary="Look the domain's DNS records up now",
)
async def check_domain(app: str, domain: str, request: Request, caller: Caller) -> Any:
    """Each record's verdict (pass, missing, wrong) is stored; the domain is verified while
    its DKIM key and return path pass."""
    row = await _domain(request, caller, app, domain)
    settings: Settings = request.app.state.settings
    try:
        result = await dnscheck.check_domain(
            _store(request), settings, row["name"], app_id=row["app_id"]
        )
    except tenancy.TenancyError as exc:
        raise ApiError(404, "not_found", str(exc), "domain") from None
    return result.as_json()


@router.post(
    "/apps/{app}/domains/{domain}/rotate-dkim",
    response_model=DomainOut,
    summary="Rotate the domain's DKIM key",
)
async def rotate_dkim(
    app: str, domain: str, body: RotateIn, request: Request, caller: Caller
) -> dict[str, Any]:
    """A new key under a new selector signs the domain's mail from now on. The previous key
    is listed (purpose `dkim_previous`) for `grace_days`: keep both published meanwhile, so
    mail signed before the rotation still verifies; then remove the old record."""
    row = await _domain(request, caller, app, domain)
    previous = row["dkim_selector"]
    after = await _call(
        tenancy.rotate_dkim,
        _store(request),
        row["name"],
        app_id=row["app_id"],
        grace_days=body.grace_days,
    )
    _audit(
        request,
        caller,
        "domain.dkim_rotate",
        row["name"],
        {"selector": after["dkim_selector"], "previous": previous, "grace_days": body.grace_days},
    )
    return _domain_out(request, after, app)


# -- webhooks -----------------------------------------------------------------------------------


class ManagedWebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_LENGTH)
    event_types: list[EventType] = Field(default_factory=list)
    enabled: bool = True
    format: WebhookFormat = "native"


class ManagedWebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=MAX_URL_LENGTH)
    event_types: list[EventType] | None = None
    enabled: bool | None = None
    format: WebhookFormat | None = None


@router.get("/apps/{app}/webhooks", response_model=WebhookList, summary="An app's webhooks")
async def list_webhooks(app: str, request: Request, caller: Caller) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    return {"data": await _call(hooks.list_webhooks, _store(request), row["id"])}


@router.post(
    "/apps/{app}/webhooks",
    status_code=201,
    response_model=WebhookCreated,
    summary="Add a webhook endpoint",
)
async def create_webhook(
    app: str, body: ManagedWebhookIn, request: Request, caller: Caller
) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    created = await _call(
        hooks.create_webhook,
        _store(request),
        row["id"],
        body.url,
        [str(t) for t in body.event_types],
        enabled=body.enabled,
        format=body.format,
        policy=DestinationPolicy.from_settings(request.app.state.settings),
    )
    _audit(request, caller, "webhook.create", app, {"id": created["id"], "format": body.format})
    return created


@router.patch(
    "/apps/{app}/webhooks/{webhook_id}", response_model=WebhookOut, summary="Change a webhook"
)
async def update_webhook(
    app: str, webhook_id: RowId, body: ManagedWebhookPatch, request: Request, caller: Caller
) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    changes = body.model_dump(exclude_unset=True)
    if changes.get("event_types") is not None:
        changes["event_types"] = [str(t) for t in changes["event_types"]]
    after = await _call(
        hooks.update_webhook,
        _store(request),
        row["id"],
        webhook_id,
        policy=DestinationPolicy.from_settings(request.app.state.settings),
        **changes,
    )
    _audit(request, caller, "webhook.update", app, {"id": webhook_id, "changed": sorted(changes)})
    return after


@router.delete("/apps/{app}/webhooks/{webhook_id}", status_code=204, summary="Remove a webhook")
async def delete_webhook(app: str, webhook_id: RowId, request: Request, caller: Caller) -> Response:
    row = await _app_of(request, caller, app)
    await _call(hooks.delete_webhook, _store(request), row["id"], webhook_id)
    _audit(request, caller, "webhook.delete", app, {"id": webhook_id})
    return Response(status_code=204)


@router.post(
    "/apps/{app}/webhooks/{webhook_id}/rotate-secret",
    response_model=RotatedSecret,
    summary="Rotate a webhook's secret",
)
async def rotate_webhook_secret(
    app: str, webhook_id: RowId, request: Request, caller: Caller
) -> dict[str, Any]:
    row = await _app_of(request, caller, app)
    rotated = await _call(hooks.rotate_secret, _store(request), row["id"], webhook_id)
    _audit(request, caller, "webhook.rotate_secret", app, {"id": webhook_id})
    return rotated


# -- users and roles ----------------------------------------------------------------------------


class UserOut(BaseModel):
    id: int
    email: str
    role: Literal["owner", "admin", "viewer"]
    last_login_at: datetime | None
    created_at: datetime = Field(description="When the user joined the organization")


class UserList(BaseModel):
    data: list[UserOut]


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=320)
    password: str | None = Field(
        None, min_length=8, max_length=1000, description="Absent: one is made and shown once"
    )
    role: Literal["owner", "admin", "viewer"] = "viewer"


class UserCreated(BaseModel):
    id: int
    email: str
    role: str
    password: str | None = Field(None, description="The password made for the user: shown once")


class RoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["owner", "admin", "viewer"]


class RoleOut(BaseModel):
    id: int
    role: str
    previous_role: str


@router.get("/users", response_model=UserList, summary="The organization's users")
async def list_users(request: Request, caller: Caller) -> dict[str, Any]:
    return {"data": await _call(tenancy.list_members, _store(request), caller.organization_id)}


@router.post("/users", status_code=201, response_model=UserCreated, summary="Add a web user")
async def create_user(body: UserIn, request: Request, caller: Caller) -> dict[str, Any]:
    import secrets

    store = _store(request)
    made = body.password is None
    password = secrets.token_urlsafe(15) if body.password is None else body.password
    org = await run_in_threadpool(_org_name, store, caller.organization_id)
    user_id = await _call(
        tenancy.create_user, store, body.email, password, role=body.role, organization=org
    )
    email = body.email.strip().lower()
    _audit(request, caller, "user.create", email, {"role": body.role})
    return {
        "id": user_id,
        "email": email,
        "role": body.role,
        "password": password if made else None,
    }


@router.patch("/users/{user_id}", response_model=RoleOut, summary="Change a user's role")
async def set_role(
    user_id: RowId, body: RoleIn, request: Request, caller: Caller
) -> dict[str, Any]:
    changed = await _call(
        tenancy.set_role, _store(request), caller.organization_id, user_id, body.role
    )
    _audit(
        request, caller, "user.role", str(user_id), {"role": [changed["previous_role"], body.role]}
    )
    return changed


@router.delete("/users/{user_id}", status_code=204, summary="Take a user out of the organization")
async def remove_user(user_id: RowId, request: Request, caller: Caller) -> Response:
    await _call(tenancy.remove_member, _store(request), caller.organization_id, user_id)
    _audit(request, caller, "user.remove", str(user_id))
    return Response(status_code=204)


# -- organisation tokens ------------------------------------------------------------------------


class TokenOut(BaseModel):
    id: int
    name: str
    lookup: str = Field(description="The token's public part, after `pbo_`")
    created_at: datetime
    revoked_at: datetime | None


class TokenList(BaseModel):
    data: list[TokenOut]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=100)


class TokenCreated(BaseModel):
    id: int
    organization: str
    name: str
    token: str = Field(description="`pbo_…`: shown this once")


@router.get("/tokens", response_model=TokenList, summary="The organization's tokens")
async def list_tokens(request: Request, caller: Caller) -> dict[str, Any]:
    return {"data": await _call(tenancy.list_org_tokens, _store(request), caller.organization_id)}


@router.post("/tokens", status_code=201, response_model=TokenCreated, summary="Make a token")
async def create_token(body: TokenIn, request: Request, caller: Caller) -> dict[str, Any]:
    store = _store(request)
    org = await run_in_threadpool(_org_name, store, caller.organization_id)
    created = await _call(tenancy.create_org_token, store, org, body.name)
    _audit(request, caller, "token.create", str(created["id"]), {"name": body.name})
    return created


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token")
async def revoke_token(token_id: RowId, request: Request, caller: Caller) -> Response:
    """It stops working with the next request (a token may revoke itself)."""
    await _call(tenancy.revoke_org_token, _store(request), caller.organization_id, token_id)
    _audit(request, caller, "token.revoke", str(token_id))
    return Response(status_code=204)


# -- the audit log ------------------------------------------------------------------------------


class AuditEntry(BaseModel):
    id: int
    actor: str
    action: str
    target: str
    data: dict[str, Any]
    ip: str | None
    created_at: datetime


class AuditList(BaseModel):
    data: list[AuditEntry] = Field(description="Newest first")
    next_cursor: int | None


@router.get("/audit", response_model=AuditList, summary="The organization's audit log")
async def read_audit(
    request: Request,
    caller: Caller,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = AUDIT_PAGE,
    cursor: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="`next_cursor` of the previous page")
    ] = None,
) -> dict[str, Any]:
    def load() -> dict[str, Any]:
        query = select(audit_log).where(audit_log.c.organization_id == caller.organization_id)
        if action:
            query = query.where(audit_log.c.action == action)
        if cursor is not None:
            query = query.where(audit_log.c.id < cursor)
        with _store(request).read() as conn:
            rows = conn.execute(query.order_by(audit_log.c.id.desc()).limit(limit + 1)).mappings()
            found = [dict(r) for r in rows]
        page = found[:limit]
        return {
            "data": [{k: r[k] for k in AuditEntry.model_fields} for r in page],
            "next_cursor": page[-1]["id"] if len(found) > limit else None,
        }

    return await run_in_threadpool(load)
