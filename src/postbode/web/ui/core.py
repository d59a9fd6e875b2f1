"""What every UI page shares: templates, the route class (CSRF, security headers, HTML error
pages), who is signed in with which role, flash notices and the audit log."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from sqlalchemy import Connection, delete, func, insert, select
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive

from postbode import __version__
from postbode.config import Settings
from postbode.store.engine import Store, secret_key
from postbode.store.schema import (
    app_alerts,
    apps,
    audit_log,
    memberships,
    organizations,
    users,
    utcnow,
    web_sessions,
)
from postbode.web.ui import tokens

SESSION_COOKIE = "pb_session"
PRE_COOKIE = "pb_pre"  # a signed nonce that binds the CSRF token of the login and setup forms
FLASH_COOKIE = "pb_flash"
SESSION_MAX_AGE = 12 * 3600  # seconds a sign-in lasts, however active the user is
PRE_MAX_AGE = 3600
FLASH_MAX_AGE = 120
MAX_FORM_BYTES = 1024 * 1024  # request bodies of ordinary forms
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # request bodies of file uploads (CSV import)
ROLE_RANK = {"viewer": 0, "admin": 1, "owner": 2}
ALERTS_SHOWN_FOR = timedelta(days=1)  # the banner counts alerts this recent
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# Pages of the app: scripts and styles from our own static files only, never inline; not
# frameable. The message preview sets its own, stricter policy (see messages.py).
APP_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; frame-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


class LoginRequired(Exception):
    """Nobody is signed in (or the session expired): the route class redirects to the login."""


class UiError(Exception):
    """An error shown as an HTML page with this status."""

    def __init__(
        self, status: int, message: str, *, title: str = "", headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers)
        self.title = title or _TITLES.get(status, "Something went wrong")


_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Cannot do that",
    429: "Too many attempts",
}


# -- templates ---------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    future = seconds < 0
    text = duration(abs(seconds))
    return f"in {text}" if future else f"{text} ago"


def duration(seconds: float | None) -> str:
    """A length of time as people say it: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def _number(value: float | int | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}".replace(",", "\u202f")  # narrow no-break space between thousands


def _percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.1f}\u202f%"


def _ms(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value = value / 1024  # type: ignore[assignment]
    return str(value)


def readable(value: Any) -> str:
    """An event's or audit entry's value as a person reads it: `yes`/`no`, `key: value`
    pairs, lists joined by commas (never Python's repr)."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return _when(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {readable(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(readable(v) for v in value) or "—"
    return str(value)


def _static(path: str) -> str:
    return f"/static/{path}?v={__version__}"


def _build_env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its name: nothing reaches a page unescaped
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        ago=_ago,
        duration=duration,
        number=_number,
        percent=_percent,
        ms=_ms,
        size=_size,
        readable=readable,
    )
    env.globals.update(static=_static, version=__version__)
    return env


templates = _build_env()


# -- keys, sessions, who is signed in --------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    session: bytes
    csrf: bytes
    flash: bytes


def keys(request: Request) -> Keys:
    """The UI's signing keys, derived once per process from the installation's secret key."""
    found: Keys | None = getattr(request.app.state, "ui_keys", None)
    if found is None:
        secret = secret_key(settings_of(request), store_of(request))
        found = Keys(
            tokens.derive_key(secret, "session"),
            tokens.derive_key(secret, "csrf"),
            tokens.derive_key(secret, "flash"),
        )
        request.app.state.ui_keys = found
    return found


def store_of(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def session_payload(request: Request) -> dict[str, Any] | None:
    """The signed session of this request, if it carries a valid, unexpired one."""
    return tokens.unsign(
        keys(request).session, request.cookies.get(SESSION_COOKIE), SESSION_MAX_AGE, time.time()
    )


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    """HttpOnly, SameSite=Lax, and Secure when the request came over https."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_https(request),
    )


def _session_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(store: Store, user_id: int, ip: str | None) -> str:
    """A new server-side session for the user; returns the token its cookie carries. Expired
    sessions of anyone are forgotten on the way."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with store.write() as conn:
        conn.execute(delete(web_sessions).where(web_sessions.c.expires_at <= now))
        conn.execute(
            insert(web_sessions).values(
                id=_session_id(token),
                user_id=user_id,
                expires_at=now + timedelta(seconds=SESSION_MAX_AGE),
                ip=ip,
                created_at=now,
            )
        )
    return token


def session_alive(conn: Connection, token: object, user_id: object) -> bool:
    """Whether the session `token` names is still on record for `user_id`, unexpired."""
    if not isinstance(token, str) or not token:
        return False
    owner = conn.execute(
        select(web_sessions.c.user_id).where(
            web_sessions.c.id == _session_id(token), web_sessions.c.expires_at > utcnow()
        )
    ).scalar()
    return owner is not None and owner == user_id


def end_session(store: Store, token: object) -> None:
    """Sign one browser out: its session is gone on every node at once."""
    if isinstance(token, str) and token:
        with store.write() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.id == _session_id(token)))


def end_user_sessions(conn: Connection, user_id: int) -> int:
    """Sign a user out everywhere (in the caller's transaction); returns how many sessions."""
    return int(conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user_id)).rowcount)


async def live_session(request: Request) -> dict[str, Any] | None:
    """The request's session when its cookie is valid and the session is still on record
    (not signed out, not ended by a password change or by removing the user)."""
    payload = session_payload(request)
    if payload is None:
        return None

    def alive() -> bool:
        with store_of(request).read() as conn:
            return session_alive(conn, payload.get("s"), payload.get("u"))

    return payload if await run_in_threadpool(alive) else None


async def start_session(
    request: Request,
    response: Response,
    user_id: int,
    org_id: int,
    pw: str,
    token: str | None = None,
) -> None:
    """Sign the user in: a new server-side session (or the given one, for switching
    organization) and a fresh nonce (a session never inherits a pre-login value)."""
    if token is None:
        token = await run_in_threadpool(
            create_session, store_of(request), user_id, client_ip(request)
        )
    value = tokens.sign(
        keys(request).session,
        {
            "u": user_id,
            "o": org_id,
            "s": token,
            "n": tokens.new_nonce(),
            "pv": tokens.fingerprint(pw),
        },
        time.time(),
    )
    set_cookie(request, response, SESSION_COOKIE, value, SESSION_MAX_AGE)
    response.delete_cookie(PRE_COOKIE, path="/")


@dataclass(frozen=True)
class AppRef:
    id: int
    name: str
    hold_reason: str | None = None  # the app is held (abuse/hold.py): shown as a banner


@dataclass
class Viewer:
    """The signed-in user, their organization and role there, and the app in view."""

    user_id: int
    email: str
    role: str
    org_id: int
    org_name: str
    nonce: str
    csrf: str
    apps: list[AppRef]
    session: str = ""  # the token of the server-side session
    organizations: list[dict[str, Any]] = field(default_factory=list)
    app: AppRef | None = None  # the app picked with ?app=…; None: every app of the organization
    recent_alerts: int = 0  # the organization's alerts of the last day (abuse/alerts.py)

    @property
    def can_change(self) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK["admin"]

    @property
    def is_owner(self) -> bool:
        return self.role == "owner"

    @property
    def app_ids(self) -> list[int]:
        return [self.app.id] if self.app else [a.id for a in self.apps]

    def app_named(self, name: str | None) -> AppRef | None:
        return next((a for a in self.apps if a.name == name), None)

    def app_by_id(self, app_id: int) -> AppRef | None:
        return next((a for a in self.apps if a.id == app_id), None)


def _load_viewer(store: Store, payload: dict[str, Any], app_name: str | None) -> Viewer | None:
    user_id, org_id = payload.get("u"), payload.get("o")
    if not isinstance(user_id, int) or not isinstance(org_id, int):
        return None
    with store.read() as conn:
        user = conn.execute(
            select(users.c.email, users.c.password_hash).where(users.c.id == user_id)
        ).first()
        if user is None or payload.get("pv") != tokens.fingerprint(user.password_hash):
            return None
        if not session_alive(conn, payload.get("s"), user_id):
            return None
        orgs = conn.execute(
            select(organizations.c.id, organizations.c.name, memberships.c.role)
            .join(memberships, memberships.c.organization_id == organizations.c.id)
            .where(memberships.c.user_id == user_id)
            .order_by(organizations.c.name)
        ).all()
        current = next((o for o in orgs if o.id == org_id), None)
        if current is None or current.role not in ROLE_RANK:
            return None
        app_rows = conn.execute(
            select(apps.c.id, apps.c.name, apps.c.hold_reason)
            .where(apps.c.organization_id == org_id)
            .order_by(apps.c.name)
        ).all()
        recent_alerts = (
            conn.execute(
                select(func.count())
                .select_from(app_alerts)
                .where(
                    app_alerts.c.app_id.in_([a.id for a in app_rows]),
                    app_alerts.c.created_at > datetime.now(UTC) - ALERTS_SHOWN_FOR,
                )
            ).scalar_one()
            if app_rows
            else 0
        )
    app_refs = [AppRef(a.id, a.name, a.hold_reason) for a in app_rows]
    nonce = str(payload.get("n", ""))
    return Viewer(
        user_id=user_id,
        email=user.email,
        role=current.role,
        org_id=org_id,
        org_name=current.name,
        nonce=nonce,
        csrf="",
        apps=app_refs,
        session=str(payload.get("s")),
        organizations=[{"id": o.id, "name": o.name, "role": o.role} for o in orgs],
        app=next((a for a in app_refs if a.name == app_name), None),
        recent_alerts=int(recent_alerts),
    )


def any_user(store: Store) -> bool:
    """Whether anyone can sign in yet (if not, the first-run page creates the owner)."""
    with store.read() as conn:
        return conn.execute(select(func.count()).select_from(users)).scalar_one() > 0


async def signed_in(request: Request) -> Viewer:
    """The signed-in user; LoginRequired (a redirect to the login page) otherwise."""
    payload = session_payload(request)
    if payload is None:
        raise LoginRequired
    viewer = await run_in_threadpool(
        _load_viewer, store_of(request), payload, request.query_params.get("app")
    )
    if viewer is None:
        raise LoginRequired
    viewer.csrf = tokens.csrf_token(keys(request).csrf, viewer.nonce)
    request.state.viewer = viewer
    return viewer


async def can_change(viewer: Annotated[Viewer, Depends(signed_in)]) -> Viewer:
    """An admin or owner: people who change things."""
    if not viewer.can_change:
        raise UiError(403, "Your role (viewer) can look but not change anything here.")
    return viewer


async def is_owner(viewer: Annotated[Viewer, Depends(signed_in)]) -> Viewer:
    """An owner: the people who manage users."""
    if not viewer.is_owner:
        raise UiError(403, "Only an owner of the organization manages its users.")
    return viewer


SignedIn = Annotated[Viewer, Depends(signed_in)]
CanChange = Annotated[Viewer, Depends(can_change)]
IsOwner = Annotated[Viewer, Depends(is_owner)]


def pick_app(viewer: Viewer) -> AppRef:
    """The app a page about one app shows: the one in view, else the first; 404 page if none."""
    chosen = viewer.app or (viewer.apps[0] if viewer.apps else None)
    if chosen is None:
        raise UiError(404, "This organization has no apps yet: create one under Settings.")
    viewer.app = chosen
    return chosen


# -- rendering ---------------------------------------------------------------------------------


def url(path: str, viewer: Viewer | None = None, /, **params: Any) -> str:
    """`path` with query parameters; the app in view is kept unless `app` is given (None drops
    it). Parameters that are None or empty are left out."""
    query: dict[str, Any] = {}
    if viewer is not None and viewer.app is not None:
        query["app"] = viewer.app.name
    query.update(params)
    pairs: list[tuple[str, Any]] = []
    for key, value in query.items():
        if value is None or value == "":
            continue
        if isinstance(value, list | tuple):
            pairs.extend((key, v) for v in value)
        else:
            pairs.append((key, value))
    return f"{path}?{urlencode(pairs)}" if pairs else path


def take_flash(request: Request) -> dict[str, str] | None:
    payload = tokens.unsign(
        keys(request).flash, request.cookies.get(FLASH_COOKIE), FLASH_MAX_AGE, time.time()
    )
    if payload is None or not isinstance(payload.get("t"), str):
        return None
    return {"text": payload["t"], "kind": str(payload.get("k", "ok"))}


def redirect(
    request: Request, location: str, flash: str | None = None, kind: str = "ok"
) -> Response:
    """303 to `location` (POST, redirect, GET), with a notice for the next page."""
    response = RedirectResponse(location, status_code=303)
    if flash:
        value = tokens.sign(keys(request).flash, {"t": flash[:500], "k": kind}, time.time())
        set_cookie(request, response, FLASH_COOKIE, value, FLASH_MAX_AGE)
    return response


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """A page (or fragment) rendered with the viewer, the CSRF token and any flash notice."""
    viewer: Viewer | None = getattr(request.state, "viewer", None)
    flash = take_flash(request) if FLASH_COOKIE in request.cookies else None
    page = templates.get_template(template)
    html = page.render(
        request=request,
        viewer=viewer,
        csrf=viewer.csrf if viewer else getattr(request.state, "pre_csrf", ""),
        flash=flash,
        url=lambda path, **params: url(path, viewer, **params),
        path=request.url.path,
        now=datetime.now(UTC),
        **(context or {}),
    )
    response = HTMLResponse(html, status_code=status, headers=headers)
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def csrf_field(token: str) -> Markup:
    """The hidden input every form carries."""
    return Markup('<input type="hidden" name="csrf_token" value="{}">').format(token)


templates.globals["csrf_field"] = csrf_field


# -- the route class: CSRF, size limits, errors as pages, security headers ---------------------


def safe_next(value: str | None) -> str:
    """A local path to go to after signing in (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = url("/login", None, next=target if request.method in SAFE_METHODS else None)
    response: Response
    if request.headers.get("hx-request"):
        response = Response(status_code=204, headers={"HX-Redirect": location})
    else:
        response = RedirectResponse(location, status_code=303)
    if SESSION_COOKIE in request.cookies:  # a session that ended: its cookie goes too
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def error_page(request: Request, exc: UiError) -> Response:
    if request.headers.get("hx-request") and exc.status in (401, 403):
        # A poll or action on a page whose session ended: let the browser reload it.
        return Response(status_code=exc.status, headers=exc.headers)
    return render(
        request,
        "error.html",
        {"status": exc.status, "title": exc.title, "message": exc.message},
        status=exc.status,
        headers=exc.headers,
    )


async def missing_page(request: Request, status: int, detail: str) -> Response:
    """The styled page for a path that is not there (or not for this method), for browsers."""
    signed_in = await live_session(request) is not None
    message = (
        "There is no page at this address. It may have moved, or the link may be mistyped."
        if status == 404
        else "This page cannot be used that way."
    )
    response = render(
        request,
        "error.html",
        {
            "status": status,
            "title": _TITLES.get(status, detail or "Something went wrong"),
            "message": message,
            "home": "/dashboard" if signed_in else "/login",
        },
        status=status,
    )
    security_headers(request, response)
    return response


class _TooLarge(Exception):
    pass


def _capped(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
        return message

    return capped


def same_origin(request: Request) -> bool:
    """No Origin header, or one naming this host (proxies may end TLS, so the scheme is not
    compared); `null` (a sandboxed frame, a privacy redirect) never is."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


async def check_csrf(request: Request) -> None:
    """A POST must carry the CSRF token of this browser's session in the form field
    `csrf_token` or the `X-CSRF-Token` header (htmx); else 403. While a session is alive only
    its token counts; the pre-login visit's token counts only when no one is signed in (the
    login and first-run forms). Without either, the body is not even read."""
    if not same_origin(request):
        raise UiError(403, "This request came from another site and was refused.")
    refused = UiError(
        403,
        "The form was missing its security token or it expired. Reload the page and try again.",
        title="Request refused",
    )
    k = keys(request)
    session = await live_session(request)
    if session is not None:
        nonce = str(session.get("n", ""))
    else:
        pre = tokens.unsign(k.session, request.cookies.get(PRE_COOKIE), PRE_MAX_AGE, time.time())
        nonce = str(pre.get("n", "")) if pre is not None else ""
    if not nonce:
        raise refused
    token = request.headers.get("x-csrf-token")
    if token is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form(max_files=1, max_fields=2000)
            value = form.get("csrf_token")
            token = value if isinstance(value, str) else None
    if not tokens.csrf_ok(k.csrf, nonce, token):
        raise refused


def security_headers(request: Request, response: Response) -> None:
    """Headers on every UI response; a response that set its own CSP or framing keeps them."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", APP_CSP)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cache-Control", "no-store")
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=(), payment=()"


class UiRoute(APIRoute):
    """A UI route: bodies capped, CSRF checked on every unsafe method before the endpoint runs,
    errors answered as HTML pages, security headers on every response."""

    body_limit = MAX_FORM_BYTES

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.body_limit

        async def handle(request: Request) -> Response:
            request = Request(request.scope, _capped(request.receive, limit))
            response: Response
            try:
                length = request.headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise _TooLarge
                if request.method not in SAFE_METHODS:
                    await check_csrf(request)
                response = await handler(request)
            except LoginRequired:
                response = _to_login(request)
            except UiError as exc:
                response = error_page(request, exc)
            except _TooLarge:
                response = error_page(
                    request, UiError(413, f"The upload is larger than {limit // 1024} KB.")
                )
            except HTTPException as exc:
                response = error_page(
                    request, UiError(exc.status_code, str(exc.detail), headers=exc.headers or {})
                )
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ())[1:])
                message = f"{where}: {first.get('msg', 'invalid')}" if where else "Invalid request."
                response = error_page(request, UiError(400, message))
            finally:
                await request.close()  # the uploaded files of a parsed form
            security_headers(request, response)
            return response

        return handle


class UploadRoute(UiRoute):
    """A UI route that takes a file upload (a larger body)."""

    body_limit = MAX_UPLOAD_BYTES


# -- the audit log -----------------------------------------------------------------------------


def audit(
    conn: Connection,
    viewer: Viewer | None,
    request: Request,
    action: str,
    target: str = "",
    data: Mapping[str, Any] | None = None,
    *,
    actor: str | None = None,
    org_id: int | None = None,
) -> None:
    """Write who did what to which target, from where, in the caller's transaction."""
    conn.execute(
        insert(audit_log).values(
            organization_id=org_id if org_id is not None else (viewer.org_id if viewer else None),
            user_id=viewer.user_id if viewer else None,
            actor=actor or (viewer.email if viewer else "anonymous"),
            action=action,
            target=target[:200],
            data=dict(data or {}),
            ip=client_ip(request),
        )
    )


def audit_now(
    store: Store,
    viewer: Viewer,
    request: Request,
    action: str,
    target: str = "",
    data: Mapping[str, Any] | None = None,
) -> None:
    """`audit` in a transaction of its own, for changes a service function made in its own
    transaction (a crash between the two loses the audit row, never the change's own events)."""
    with store.write() as conn:
        audit(conn, viewer, request, action, target, data)


def parse_time(value: str | None) -> datetime | None:
    """A time from a form (`datetime-local` or ISO 8601), taken as UTC without a zone."""
    if not value or not value.strip():
        return None
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UiError(400, f"Not a time: {value[:40]!r}. Use YYYY-MM-DD HH:MM (UTC).") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


RANGES: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
