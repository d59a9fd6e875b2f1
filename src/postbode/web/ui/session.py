"""Signing in and out: the login form with throttling, the first-run page, the organization
switch; the session cookie itself is made in core.py."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from sqlalchemy import delete, func, insert, select, update
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import login_attempts, memberships, users, utcnow
from postbode.web.ui import tokens
from postbode.web.ui.core import (
    PRE_COOKIE,
    PRE_MAX_AGE,
    SESSION_COOKIE,
    SignedIn,
    UiError,
    UiRoute,
    any_user,
    audit,
    client_ip,
    keys,
    redirect,
    render,
    safe_next,
    session_payload,
    set_cookie,
    start_session,
    store_of,
)

THROTTLE_WINDOW = 15 * 60  # seconds over which failed sign-ins are counted
MAX_FAILURES_PER_EMAIL = 5  # then that address is refused for the rest of the window
MAX_FAILURES_PER_IP = 10  # more than per address: colleagues behind one NAT make typos too
MAX_FIELD = 320

router = APIRouter(route_class=UiRoute, include_in_schema=False)


# -- throttling ---------------------------------------------------------------------------------


def throttle_keys(ip: str | None, email: str) -> list[tuple[str, int]]:
    """The counters a sign-in attempt is checked against, with their limits."""
    found = [(f"email:{email.strip().lower()[:MAX_FIELD]}", MAX_FAILURES_PER_EMAIL)]
    if ip:
        found.append((f"ip:{ip}", MAX_FAILURES_PER_IP))
    return found


def retry_after(store: Store, counters: list[tuple[str, int]], now: float) -> int | None:
    """Seconds until another attempt is allowed, when a counter is at its limit; else None."""
    since = now - THROTTLE_WINDOW
    wait: int | None = None
    with store.read() as conn:
        for key, limit in counters:
            times = (
                conn.execute(
                    select(login_attempts.c.at)
                    .where(login_attempts.c.key == key, login_attempts.c.at > since)
                    .order_by(login_attempts.c.at.desc())
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            if len(times) >= limit:
                # Allowed again once the oldest of the last `limit` failures leaves the window.
                seconds = int(min(times) + THROTTLE_WINDOW - now) + 1
                wait = max(wait or 0, seconds)
    return wait


def record_failure(store: Store, counters: list[tuple[str, int]], now: float) -> None:
    """Count a failed sign-in against every counter, and forget those counters' old failures."""
    with store.write() as conn:
        conn.execute(insert(login_attempts), [{"key": key, "at": now} for key, _ in counters])
        conn.execute(
            delete(login_attempts).where(
                login_attempts.c.key.in_([key for key, _ in counters]),
                login_attempts.c.at <= now - THROTTLE_WINDOW,
            )
        )


def _signed_in(store: Store, user_id: int, email_key: str) -> tuple[int, str] | None:
    """After a correct password: forget the address's failures, note the time; returns the
    user's first organization and password hash (None if they belong to none)."""
    with store.write() as conn:
        conn.execute(delete(login_attempts).where(login_attempts.c.key == email_key))
        conn.execute(update(users).where(users.c.id == user_id).values(last_login_at=utcnow()))
        row = conn.execute(
            select(memberships.c.organization_id, users.c.password_hash)
            .join(users, users.c.id == memberships.c.user_id)
            .where(memberships.c.user_id == user_id)
            .order_by(memberships.c.organization_id)
            .limit(1)
        ).first()
    return (int(row.organization_id), str(row.password_hash)) if row else None


# -- pages ------------------------------------------------------------------------------------


def _pre_visit(request: Request, response: Response | None = None) -> str:
    """The CSRF token of a visitor who is not signed in; sets the cookie it is bound to."""
    k = keys(request)
    pre = tokens.unsign(k.session, request.cookies.get(PRE_COOKIE), PRE_MAX_AGE, time.time())
    nonce = str(pre["n"]) if pre and pre.get("n") else tokens.new_nonce()
    request.state.pre_csrf = tokens.csrf_token(k.csrf, nonce)
    request.state.pre_cookie = tokens.sign(k.session, {"n": nonce}, time.time())
    return nonce


def _with_pre(request: Request, response: Response) -> Response:
    set_cookie(request, response, PRE_COOKIE, request.state.pre_cookie, PRE_MAX_AGE)
    return response


def _login_page(
    request: Request, *, email: str = "", error: str = "", status: int = 200, next: str = "/"
) -> Response:
    _pre_visit(request)
    response = render(
        request, "login.html", {"email": email, "error": error, "next": next}, status=status
    )
    return _with_pre(request, response)


@router.get("/login")
async def login_form(request: Request, next: str = "/") -> Response:
    store = store_of(request)
    if not await run_in_threadpool(any_user, store):
        return redirect(request, "/setup")
    if session_payload(request) is not None:
        return redirect(request, safe_next(next))
    return _login_page(request, next=safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    email = str(form.get("email", ""))[:MAX_FIELD].strip()
    password = str(form.get("password", ""))[:1024]
    target = safe_next(str(form.get("next", "/")))
    store = store_of(request)
    counters = throttle_keys(client_ip(request), email)
    now = time.time()
    wait = await run_in_threadpool(retry_after, store, counters, now)
    if wait is not None:
        _pre_visit(request)
        response = render(
            request,
            "login.html",
            {
                "email": email,
                "next": target,
                "error": f"Too many failed sign-ins. Try again in {max(1, wait // 60)} min.",
            },
            status=429,
            headers={"Retry-After": str(wait)},
        )
        return _with_pre(request, response)
    user_id = await run_in_threadpool(tenancy.verify_user, store, email, password)
    if user_id is None:
        await run_in_threadpool(record_failure, store, counters, now)
        return _login_page(
            request,
            email=email,
            error="That e-mail address and password do not match.",
            status=401,
            next=target,
        )
    found = await run_in_threadpool(_signed_in, store, user_id, counters[0][0])
    if found is None:
        return _login_page(
            request, email=email, error="Your account is not in any organization.", status=403
        )
    org_id, password_hash = found

    def log() -> None:
        with store.write() as conn:
            audit(conn, None, request, "session.login", email, actor=email.lower(), org_id=org_id)

    await run_in_threadpool(log)
    signed = redirect(request, target)
    start_session(request, signed, user_id, org_id, password_hash)
    return signed


@router.post("/logout")
async def logout(request: Request, viewer: SignedIn) -> Response:
    store = store_of(request)

    def log() -> None:
        with store.write() as conn:
            audit(conn, viewer, request, "session.logout", viewer.email)

    await run_in_threadpool(log)
    response = redirect(request, "/login", "You are signed out.")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/session/organization")
async def switch_organization(request: Request, viewer: SignedIn) -> Response:
    form = await request.form()
    wanted = str(form.get("organization", ""))
    org = next((o for o in viewer.organizations if str(o["id"]) == wanted), None)
    if org is None:
        raise UiError(404, "You are not a member of that organization.")
    store = store_of(request)

    def password_hash() -> str:
        with store.read() as conn:
            return str(
                conn.execute(
                    select(users.c.password_hash).where(users.c.id == viewer.user_id)
                ).scalar_one()
            )

    response = redirect(request, "/", f"Switched to {org['name']}.")
    start_session(
        request, response, viewer.user_id, org["id"], await run_in_threadpool(password_hash)
    )
    return response


# -- first run ---------------------------------------------------------------------------------


@router.get("/setup")
async def setup_form(request: Request) -> Response:
    if await run_in_threadpool(any_user, store_of(request)):
        return redirect(request, "/login")
    _pre_visit(request)
    return _with_pre(request, render(request, "setup.html", {"email": "", "error": ""}))


@router.post("/setup")
async def setup(request: Request) -> Response:
    store = store_of(request)
    if await run_in_threadpool(any_user, store):
        return redirect(request, "/login", "Postbode is already set up: sign in.", "info")
    form = await request.form()
    email = str(form.get("email", ""))[:MAX_FIELD].strip()
    password = str(form.get("password", ""))[:1024]
    confirm = str(form.get("password_confirm", ""))[:1024]
    error = ""
    if password != confirm:
        error = "The two passwords differ."
    else:
        try:
            user_id, org_id, password_hash = await run_in_threadpool(
                _setup_owner, store, request, email, password
            )
        except tenancy.TenancyError as exc:
            error = str(exc)
    if error:
        _pre_visit(request)
        page = render(request, "setup.html", {"email": email, "error": error}, status=422)
        return _with_pre(request, page)
    response = redirect(request, "/", "Welcome to Postbode. Create an app to start sending.")
    start_session(request, response, user_id, org_id, password_hash)
    return response


def _setup_owner(store: Store, request: Request, email: str, password: str) -> tuple[int, int, str]:
    user_id = tenancy.create_user(store, email, password, admin=True)
    with store.write() as conn:
        first = conn.execute(select(func.min(users.c.id))).scalar_one()
        if first != user_id:  # two browsers raced through the first-run page: the first wins
            conn.execute(delete(users).where(users.c.id == user_id))
            raise tenancy.TenancyError("Postbode was set up a moment ago: sign in instead.")
        row = conn.execute(
            select(memberships.c.organization_id, users.c.password_hash)
            .join(users, users.c.id == memberships.c.user_id)
            .where(users.c.id == user_id)
        ).one()
        audit(
            conn,
            None,
            request,
            "setup.owner",
            email.lower(),
            actor=email.lower(),
            org_id=row.organization_id,
        )
    return user_id, int(row.organization_id), str(row.password_hash)
