"""Signing in and out: the login form with throttling, the first-run page, the organization
switch, the account page (password, signing out everywhere); sessions themselves are made in
core.py."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Request, Response
from sqlalchemy import delete, func, insert, select, update
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import login_attempts, memberships, users, utcnow, web_sessions
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
    end_session,
    end_user_sessions,
    keys,
    live_session,
    redirect,
    render,
    safe_next,
    set_cookie,
    start_session,
    store_of,
    url,
)

THROTTLE_WINDOW = 3600  # seconds over which failed sign-ins are counted
FREE_FAILURES_PER_PAIR = 3  # failures of one address from one IP before waits begin
FREE_FAILURES_PER_IP = 20  # failures from one IP, over every address, before waits begin
BASE_DELAY = 2.0  # seconds of the first wait; each further failure doubles it
MAX_DELAY = 15 * 60  # the longest wait: a slowdown, never a lockout of the real owner
MAX_FIELD = 320

router = APIRouter(route_class=UiRoute, include_in_schema=False)


# -- throttling ---------------------------------------------------------------------------------
# Counted per (address, IP) and per IP, never per address alone: a stranger who guesses at an
# address from elsewhere slows down only their own attempts, not the owner's. The counters
# are rows in the store, so every process on every node sees the same ones.


def throttle_keys(ip: str | None, email: str) -> list[tuple[str, int]]:
    """The counters a sign-in attempt is checked against, with their free failures."""
    address = email.strip().lower()[:MAX_FIELD]
    where = ip or "unknown"
    return [
        (f"pair:{address}|{where}", FREE_FAILURES_PER_PAIR),
        (f"ip:{where}", FREE_FAILURES_PER_IP),
    ]


def backoff(failures: int, free: int) -> float:
    """Seconds to wait after the last of `failures` failures: none for the first `free`, then
    BASE_DELAY doubling with each failure, at most MAX_DELAY."""
    if failures < free:
        return 0.0
    return min(float(MAX_DELAY), BASE_DELAY * float(2 ** min(failures - free, 32)))


def retry_after(store: Store, counters: list[tuple[str, int]], now: float) -> int | None:
    """Seconds until another attempt is allowed, when a counter asks for a wait; else None."""
    since = now - THROTTLE_WINDOW
    wait = 0.0
    with store.read() as conn:
        for key, free in counters:
            times = (
                conn.execute(
                    select(login_attempts.c.at)
                    .where(login_attempts.c.key == key, login_attempts.c.at > since)
                    .order_by(login_attempts.c.at.desc())
                    .limit(64)
                )
                .scalars()
                .all()
            )
            if times:
                wait = max(wait, max(times) + backoff(len(times), free) - now)
    return math.ceil(wait) if wait > 0 else None


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
    """After a correct password: forget the failures of this address from this IP, note the
    time; returns the user's first organization and password hash (None if in none)."""
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
    if await live_session(request) is not None:
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
                "error": f"Too many failed sign-ins. Try again in {_wait_text(wait)}.",
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
    await start_session(request, signed, user_id, org_id, password_hash)
    return signed


def _wait_text(seconds: int) -> str:
    return f"{seconds} s" if seconds < 60 else f"{math.ceil(seconds / 60)} min"


@router.post("/logout")
async def logout(request: Request, viewer: SignedIn) -> Response:
    store = store_of(request)

    def log() -> None:
        with store.write() as conn:
            audit(conn, viewer, request, "session.logout", viewer.email)

    await run_in_threadpool(end_session, store, viewer.session)
    await run_in_threadpool(log)
    response = redirect(request, "/login", "You are signed out.")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- the account page ---------------------------------------------------------------------------


@router.get("/account")
async def account_page(request: Request, viewer: SignedIn) -> Response:
    def count() -> int:
        with store_of(request).read() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        web_sessions.c.user_id == viewer.user_id,
                        web_sessions.c.expires_at > utcnow(),
                    )
                ).scalar_one()
            )

    return render(request, "account.html", {"sessions": await run_in_threadpool(count)})


@router.post("/account/password")
async def change_password(request: Request, viewer: SignedIn) -> Response:
    """A new password ends every session of the user, this one too, and signs this browser
    in again."""
    form = await request.form()
    current = str(form.get("current_password", ""))[:1024]
    new = str(form.get("password", ""))[:1024]
    back = url("/account", viewer)
    if new != str(form.get("password_confirm", ""))[:1024]:
        return redirect(request, back, "The two new passwords differ.", "error")
    store = store_of(request)
    if await run_in_threadpool(tenancy.verify_user, store, viewer.email, current) is None:
        return redirect(request, back, "The current password is not right.", "error")

    def change() -> str:
        hashed = tenancy.set_password(store, viewer.user_id, new)
        with store.write() as conn:
            ended = end_user_sessions(conn, viewer.user_id)
            audit(conn, viewer, request, "user.password", viewer.email, {"sessions_ended": ended})
        return hashed

    try:
        hashed = await run_in_threadpool(change)
    except tenancy.TenancyError as exc:
        return redirect(request, back, str(exc), "error")
    response = redirect(request, back, "Password changed; every other session is signed out.")
    await start_session(request, response, viewer.user_id, viewer.org_id, hashed)
    return response


@router.post("/account/sessions/end")
async def sign_out_everywhere(request: Request, viewer: SignedIn) -> Response:
    store = store_of(request)

    def end() -> None:
        with store.write() as conn:
            ended = end_user_sessions(conn, viewer.user_id)
            audit(conn, viewer, request, "session.logout_all", viewer.email, {"sessions": ended})

    await run_in_threadpool(end)
    response = redirect(request, "/login", "You are signed out everywhere.")
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
    hashed = await run_in_threadpool(password_hash)
    await start_session(request, response, viewer.user_id, org["id"], hashed, viewer.session)
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
    await start_session(request, response, user_id, org_id, password_hash)
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
