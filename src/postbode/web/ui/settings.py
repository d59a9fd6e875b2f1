"""Settings pages: apps and their credentials (secrets shown once), sending domains with the DNS
records to publish and their check, webhooks with their delivery log and replay, tracking and
retention."""

from __future__ import annotations

import uuid
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Request, Response
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from postbode import dnscheck, tenancy
from postbode.endpoints.destinations import DestinationPolicy
from postbode.events.types import EventType
from postbode.privacy.audit import RETENTION
from postbode.store.engine import Store
from postbode.store.schema import apps, domains, organizations
from postbode.web.ui.core import (
    AppRef,
    CanChange,
    IsOwner,
    SignedIn,
    UiError,
    UiRoute,
    Viewer,
    audit,
    audit_now,
    redirect,
    render,
    settings_of,
    store_of,
    url,
)
from postbode.web.ui.dashboard import org_time_zone
from postbode.webhooks import manage as webhooks

router = APIRouter(route_class=UiRoute, include_in_schema=False)

SECTIONS = ("credentials", "domains", "webhooks", "tracking")
MAX_RETENTION_DAYS = 3650
MAX_MESSAGE_AGE_SECONDS = 30 * 24 * 3600
EVENT_TYPES = [str(t) for t in EventType]
RETENTION_KEYS = ("raw_retention_days", "metadata_retention_days", "store_bodies")


def _app(viewer: Viewer, name: str) -> AppRef:
    """An app of the viewer's organization, now the app in view; 404 page otherwise."""
    found = viewer.app_named(name)
    if found is None:
        raise UiError(404, f"No app named {name!r} in {viewer.org_name}.")
    viewer.app = found
    return found


def _app_row(store: Store, app_id: int) -> dict[str, Any]:
    with store.read() as conn:
        return dict(conn.execute(select(apps).where(apps.c.id == app_id)).mappings().one())


def _page(request: Request, section: str, app: AppRef, **context: Any) -> Response:
    row = _app_row(store_of(request), app.id)
    return render(
        request,
        f"settings_{section}.html",
        {"section": section, "sections": SECTIONS, "app_row": row, **context},
    )


# -- apps -------------------------------------------------------------------------------------


@router.get("/settings")
async def apps_page(request: Request, viewer: SignedIn) -> Response:
    listed = await run_in_threadpool(tenancy.list_apps, store_of(request))
    mine = [a for a in listed if a["organization"] == viewer.org_name]
    zone = await run_in_threadpool(org_time_zone, store_of(request), viewer.org_id)
    return render(request, "settings_apps.html", {"apps_listed": mine, "time_zone": zone.key})


@router.post("/settings/time-zone")
async def set_time_zone(request: Request, viewer: IsOwner) -> Response:
    """The organisation's time zone (owners): an IANA name."""
    form = await request.form()
    name = str(form.get("time_zone") or "").strip()[:64]
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return redirect(request, url("/settings", viewer), f"Unknown time zone {name!r}.", "error")
    store = store_of(request)

    def save() -> None:
        with store.write() as conn:
            conn.execute(
                update(organizations)
                .where(organizations.c.id == viewer.org_id)
                .values(time_zone=name)
            )

    await run_in_threadpool(save)
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "organization.time_zone",
        viewer.org_name,
        {"time_zone": name},
    )
    return redirect(request, url("/settings", viewer), f"Time zone set to {name}.")


@router.post("/settings/apps")
async def create_app(request: Request, viewer: CanChange) -> Response:
    form = await request.form()
    name = str(form.get("name", "")).strip()[:100]
    store = store_of(request)

    def run() -> tenancy.NewApp:
        created = tenancy.create_app(store, name, organization=viewer.org_name)
        with store.write() as conn:
            audit(conn, viewer, request, "app.create", name)
        return created

    try:
        created = await run_in_threadpool(run)
    except tenancy.TenancyError as exc:
        return redirect(request, url("/settings", viewer), str(exc), "error")
    viewer.apps.append(AppRef(created.app_id, created.name))
    viewer.app = viewer.apps[-1]
    return render(
        request,
        "secret_once.html",
        {
            "title": f"App {created.name} created",
            "secrets": [
                ("API key", created.api_key),
                ("SMTP username", created.smtp_username),
                ("SMTP password", created.smtp_password),
            ],
            "back": url(f"/settings/apps/{created.name}", viewer),
        },
    )


# -- credentials ------------------------------------------------------------------------------


@router.get("/settings/apps/{name}")
async def credentials_page(request: Request, viewer: SignedIn, name: str) -> Response:
    app = _app(viewer, name)
    creds = await run_in_threadpool(
        tenancy.list_credentials, store_of(request), app.name, organization=viewer.org_id
    )
    return await run_in_threadpool(_page, request, "credentials", app, credentials=creds)


@router.post("/settings/apps/{name}/credentials")
async def create_credential(request: Request, viewer: CanChange, name: str) -> Response:
    app = _app(viewer, name)
    form = await request.form()
    kind = str(form.get("kind", "api"))
    label = str(form.get("name", "")).strip()[:100]
    store = store_of(request)
    try:
        created = await run_in_threadpool(
            tenancy.create_credential, store, app.name, kind, label, organization=viewer.org_id
        )
    except tenancy.TenancyError as exc:
        return redirect(request, url(f"/settings/apps/{app.name}", viewer), str(exc), "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "credential.create",
        f"{app.name}/{created['id']}",
        {"kind": kind, "name": label},
    )
    shown = (
        [("API key", created["api_key"])]
        if kind == "api"
        else [
            ("SMTP username", created["smtp_username"]),
            ("SMTP password", created["smtp_password"]),
        ]
    )
    return render(
        request,
        "secret_once.html",
        {
            "title": f"New {'API key' if kind == 'api' else 'SMTP login'} for {app.name}",
            "secrets": shown,
            "back": url(f"/settings/apps/{app.name}", viewer),
        },
    )


@router.post("/settings/apps/{name}/credentials/{credential_id}/revoke")
async def revoke_credential(
    request: Request, viewer: CanChange, name: str, credential_id: int
) -> Response:
    app = _app(viewer, name)
    store = store_of(request)
    back = url(f"/settings/apps/{app.name}", viewer)
    try:
        await run_in_threadpool(tenancy.revoke_credential, store, credential_id, app.id)
    except tenancy.TenancyError as exc:
        return redirect(request, back, str(exc), "error")
    await run_in_threadpool(
        audit_now, store, viewer, request, "credential.revoke", f"{app.name}/{credential_id}"
    )
    return redirect(request, back, "Credential revoked: it stopped working at once.")


# -- domains ----------------------------------------------------------------------------------


def _domains(store: Store, app_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [
            dict(r)
            for r in conn.execute(
                select(domains).where(domains.c.app_id == app_id).order_by(domains.c.name)
            ).mappings()
        ]


async def _domains_page(
    request: Request, app: AppRef, live: dnscheck.DomainCheck | None = None
) -> Response:
    """The app's domains with the records to publish and each one's stored check; the domain
    just checked (`live`) also shows what DNS answered."""
    settings = settings_of(request)
    rows = await run_in_threadpool(_domains, store_of(request), app.id)
    listed = []
    for row in rows:
        records = tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain)
        if row.get("inbound"):
            records = tenancy.inbound_records(row, settings.smtp_hostname) + records
        status = row["dns_status"] or {}
        fresh = {c.purpose: c for c in live.records} if live and live.domain == row["name"] else {}
        checked: list[dict[str, Any]] = []
        for record in records:
            now = fresh.get(record["purpose"])
            checked.append(
                {
                    **record,
                    "check": now.status if now else str(status.get(record["purpose"], "")),
                    "found": list(now.found) if now else None,
                    "detail": now.detail if now else "",
                    "error": now.error if now else None,
                }
            )
        listed.append({**row, "records": checked, "live": bool(fresh)})
    return await run_in_threadpool(_page, request, "domains", app, domains_listed=listed)


@router.get("/settings/apps/{name}/domains")
async def domains_page(request: Request, viewer: SignedIn, name: str) -> Response:
    return await _domains_page(request, _app(viewer, name))


@router.post("/settings/apps/{name}/domains/{domain_id}/check")
async def check_domain(request: Request, viewer: CanChange, name: str, domain_id: int) -> Response:
    """Look the domain's records up now (dnscheck), store the verdicts, show what was found."""
    app = _app(viewer, name)
    store = store_of(request)
    row = next(
        (d for d in await run_in_threadpool(_domains, store, app.id) if d["id"] == domain_id), None
    )
    if row is None:
        raise UiError(404, f"No domain {domain_id} in {app.name}.")
    live = await dnscheck.check_domain(store, settings_of(request), row["name"], app_id=app.id)
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "domain.check",
        row["name"],
        {"app": app.name, "statuses": dnscheck.statuses(live.records), "verified": live.verified},
    )
    return await _domains_page(request, app, live)


@router.post("/settings/apps/{name}/domains")
async def add_domain(request: Request, viewer: CanChange, name: str) -> Response:
    app = _app(viewer, name)
    form = await request.form()
    domain = str(form.get("domain", "")).strip()[:253]
    store = store_of(request)
    back = url(f"/settings/apps/{app.name}/domains", viewer)
    try:
        row = await run_in_threadpool(
            tenancy.add_domain, store, app.name, domain, organization=viewer.org_id
        )
    except tenancy.TenancyError as exc:
        return redirect(request, back, str(exc), "error")
    await run_in_threadpool(
        audit_now, store, viewer, request, "domain.add", row["name"], {"app": app.name}
    )
    return redirect(request, back, f"{row['name']} added: publish its DNS records below.")


# -- webhooks ---------------------------------------------------------------------------------


def _hook_form(form: FormData) -> dict[str, Any]:
    types = [str(t) for t in form.getlist("event_types")]
    return {
        "url": str(form.get("url", "")).strip(),
        "event_types": types,
        "enabled": form.get("enabled") == "on",
    }


@router.get("/settings/apps/{name}/webhooks")
async def webhooks_page(request: Request, viewer: SignedIn, name: str) -> Response:
    app = _app(viewer, name)
    hooks = await run_in_threadpool(webhooks.list_webhooks, store_of(request), app.id)
    return await run_in_threadpool(
        _page, request, "webhooks", app, hooks=hooks, event_types=EVENT_TYPES
    )


@router.post("/settings/apps/{name}/webhooks")
async def create_webhook(request: Request, viewer: CanChange, name: str) -> Response:
    app = _app(viewer, name)
    values = _hook_form(await request.form())
    store = store_of(request)
    back = url(f"/settings/apps/{app.name}/webhooks", viewer)
    try:
        hook = await run_in_threadpool(
            webhooks.create_webhook,
            store,
            app.id,
            values["url"],
            values["event_types"],
            enabled=values["enabled"],
            policy=DestinationPolicy.from_settings(settings_of(request)),
        )
    except webhooks.WebhookError as exc:
        return redirect(request, back, exc.message, "error")
    await run_in_threadpool(
        audit_now,
        store,
        viewer,
        request,
        "webhook.create",
        f"{app.name}/{hook['id']}",
        {"url": hook["url"], "event_types": hook["event_types"]},
    )
    return render(
        request,
        "secret_once.html",
        {
            "title": f"Webhook {hook['id']} created",
            "intro": f"Requests to {hook['url']} are signed with this secret.",
            "kept": "encrypted",
            "secrets": [("Signing secret", hook["secret"])],
            "back": url(f"/settings/apps/{app.name}/webhooks/{hook['id']}", viewer),
        },
    )


@router.get("/settings/apps/{name}/webhooks/{hook_id}")
async def webhook_page(
    request: Request, viewer: SignedIn, name: str, hook_id: int, cursor: uuid.UUID | None = None
) -> Response:
    app = _app(viewer, name)
    store = store_of(request)
    status = request.query_params.get("status") or None
    if status not in (None, *webhooks.REQUEST_STATUSES):
        raise UiError(400, "Unknown request status.")

    def load() -> tuple[dict[str, Any], list[dict[str, Any]], uuid.UUID | None]:
        hook = webhooks.get_webhook(store, app.id, hook_id)
        log, after = webhooks.list_requests(
            store, app.id, hook_id, status=status, cursor=cursor, limit=25
        )
        return hook, log, after

    try:
        hook, log, after = await run_in_threadpool(load)
    except webhooks.WebhookError as exc:
        raise UiError(exc.status, exc.message) from None
    base = f"/settings/apps/{app.name}/webhooks/{hook_id}"
    return await run_in_threadpool(
        _page,
        request,
        "webhook",
        app,
        hook=hook,
        log=log,
        event_types=EVENT_TYPES,
        request_statuses=webhooks.REQUEST_STATUSES,
        status=status or "",
        next_url=url(base, viewer, status=status, cursor=str(after)) if after else None,
    )


async def _hook_change(
    request: Request, viewer: Viewer, name: str, hook_id: int, action: str
) -> Response:
    app = _app(viewer, name)
    store = store_of(request)
    form = await request.form()
    page = url(f"/settings/apps/{app.name}/webhooks/{hook_id}", viewer)
    target = f"{app.name}/{hook_id}"
    try:
        if action == "update":
            values = _hook_form(form)
            policy = DestinationPolicy.from_settings(settings_of(request))
            await run_in_threadpool(
                webhooks.update_webhook, store, app.id, hook_id, policy=policy, **values
            )
            await run_in_threadpool(
                audit_now, store, viewer, request, "webhook.update", target, values
            )
            return redirect(request, page, "Webhook saved.")
        if action == "delete":
            await run_in_threadpool(webhooks.delete_webhook, store, app.id, hook_id)
            await run_in_threadpool(audit_now, store, viewer, request, "webhook.delete", target)
            return redirect(
                request, url(f"/settings/apps/{app.name}/webhooks", viewer), "Webhook deleted."
            )
        if action == "rotate":
            rotated = await run_in_threadpool(webhooks.rotate_secret, store, app.id, hook_id)
            await run_in_threadpool(audit_now, store, viewer, request, "webhook.rotate", target)
            return render(
                request,
                "secret_once.html",
                {
                    "title": f"New secret for webhook {hook_id}",
                    "intro": "For 24 hours requests carry a second signature made with the "
                    "previous secret, so the receiver can switch at leisure.",
                    "kept": "encrypted",
                    "secrets": [("Signing secret", rotated["secret"])],
                    "back": page,
                },
            )
        if action == "replay":
            try:
                event_id = uuid.UUID(str(form.get("event_id", "")))
            except ValueError:
                raise UiError(400, "Not an event id.") from None
            await run_in_threadpool(webhooks.replay, store, app.id, hook_id, event_id)
            await run_in_threadpool(
                audit_now,
                store,
                viewer,
                request,
                "webhook.replay",
                target,
                {"event_id": str(event_id)},
            )
            return redirect(request, page, f"Event {event_id} queued for the endpoint again.")
    except webhooks.WebhookError as exc:
        if exc.status == 404:
            raise UiError(404, exc.message) from None
        return redirect(request, page, exc.message, "error")
    raise UiError(404, f"No webhook action {action!r}.")


@router.post("/settings/apps/{name}/webhooks/{hook_id}/{action}")
async def change_webhook(
    request: Request, viewer: CanChange, name: str, hook_id: int, action: str
) -> Response:
    return await _hook_change(request, viewer, name, hook_id, action)


# -- tracking and retention -------------------------------------------------------------------


@router.get("/settings/apps/{name}/tracking")
async def tracking_page(request: Request, viewer: SignedIn, name: str) -> Response:
    app = _app(viewer, name)
    return await run_in_threadpool(
        _page,
        request,
        "tracking",
        app,
        default_max_age=settings_of(request).max_message_age_seconds,
    )


def _days(form: FormData, field: str) -> int:
    value = str(form.get(field, "")).strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_RETENTION_DAYS:
        raise UiError(
            422, f"{field.replace('_', ' ')}: a whole number of days, 1 to {MAX_RETENTION_DAYS}."
        )
    return int(value)


def tracking_values(form: FormData) -> dict[str, Any]:
    """The apps row values a tracking and retention form sets; UiError names a bad field."""
    values: dict[str, Any] = {
        "track_opens": form.get("track_opens") == "on",
        "track_clicks": form.get("track_clicks") == "on",
        # ticked boxes restrict (a form without them keeps the defaults)
        "tracking_allowed": form.get("tracking_off") != "on",
        "store_bodies": form.get("no_bodies") != "on",
        "raw_retention_days": _days(form, "raw_retention_days"),
        "metadata_retention_days": _days(form, "metadata_retention_days"),
    }
    hours = str(form.get("max_message_age_hours", "")).strip()
    if hours:
        if not hours.isdigit() or not 1 <= int(hours) * 3600 <= MAX_MESSAGE_AGE_SECONDS:
            raise UiError(422, "max message age: a whole number of hours, 1 to 720.")
        values["max_message_age_seconds"] = int(hours) * 3600
    else:
        values["max_message_age_seconds"] = None
    return values


@router.post("/settings/apps/{name}/tracking")
async def save_tracking(request: Request, viewer: CanChange, name: str) -> Response:
    app = _app(viewer, name)
    values = tracking_values(await request.form())
    store = store_of(request)

    def run() -> None:
        with store.write() as conn:
            before = dict(
                conn.execute(select(*(apps.c[k] for k in values)).where(apps.c.id == app.id))
                .mappings()
                .one()
            )
            conn.execute(update(apps).where(apps.c.id == app.id).values(**values))
            changed = {k: [before[k], v] for k, v in values.items() if before[k] != v}
            audit(conn, viewer, request, "app.settings", app.name, changed)
            retention = {k: v for k, v in changed.items() if k in RETENTION_KEYS}
            if retention:  # its own record, so the privacy audit finds every change
                audit(conn, viewer, request, RETENTION, app.name, retention)

    await run_in_threadpool(run)
    return redirect(
        request,
        url(f"/settings/apps/{app.name}/tracking", viewer),
        "Saved. New messages use these settings within seconds.",
    )
