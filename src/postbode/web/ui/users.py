"""The users page (owners only): the organization's members, adding a user with a role,
changing roles, and removing a member (which signs them out everywhere)."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import delete, func, select, update
from starlette.concurrency import run_in_threadpool

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import memberships, users
from postbode.web.ui.core import (
    IsOwner,
    UiError,
    UiRoute,
    audit,
    audit_now,
    end_user_sessions,
    redirect,
    render,
    store_of,
    url,
)

router = APIRouter(route_class=UiRoute, include_in_schema=False)


def members(store: Store, org_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [
            dict(r)
            for r in conn.execute(
                select(
                    users.c.id,
                    users.c.email,
                    users.c.last_login_at,
                    memberships.c.role,
                    memberships.c.created_at,
                )
                .join(memberships, memberships.c.user_id == users.c.id)
                .where(memberships.c.organization_id == org_id)
                .order_by(users.c.email)
            ).mappings()
        ]


@router.get("/users")
async def users_page(request: Request, viewer: IsOwner) -> Response:
    listed = await run_in_threadpool(members, store_of(request), viewer.org_id)
    return render(request, "users.html", {"members": listed, "roles": tenancy.ROLES})


@router.post("/users")
async def add_user(request: Request, viewer: IsOwner) -> Response:
    form = await request.form()
    email = str(form.get("email", "")).strip()[:320]
    role = str(form.get("role", "viewer"))
    password = str(form.get("password", ""))[:1024]
    generated = not password
    if generated:
        password = secrets.token_urlsafe(12)
    store = store_of(request)

    def run() -> int:
        user_id = tenancy.create_user(
            store, email, password, role=role, organization=viewer.org_name
        )
        with store.write() as conn:
            audit(conn, viewer, request, "user.create", email.lower(), {"role": role})
        return user_id

    try:
        await run_in_threadpool(run)
    except tenancy.TenancyError as exc:
        return redirect(request, url("/users", viewer), str(exc), "error")
    if not generated:
        return redirect(request, url("/users", viewer), f"{email} can now sign in as {role}.")
    return render(
        request,
        "secret_once.html",
        {
            "title": f"{email} added as {role}",
            "intro": "Give them this password over a channel you trust; it is not shown again.",
            "secrets": [("E-mail", email.lower()), ("Password", password)],
            "back": url("/users", viewer),
        },
    )


def change_role(store: Store, org_id: int, user_id: int, role: str) -> str:
    """Set a member's role; returns the old one. The last owner cannot stop being one."""
    if role not in tenancy.ROLES:
        raise UiError(422, f"Unknown role {role!r}.")
    with store.write() as conn:
        current = conn.execute(
            select(memberships.c.role).where(
                memberships.c.user_id == user_id, memberships.c.organization_id == org_id
            )
        ).scalar()
        if current is None:
            raise UiError(404, "No such member of this organization.")
        if current == "owner" and role != "owner":
            owners = conn.execute(
                select(func.count()).where(
                    memberships.c.organization_id == org_id, memberships.c.role == "owner"
                )
            ).scalar_one()
            if owners <= 1:
                raise UiError(409, "The organization needs an owner: make someone else one first.")
        conn.execute(
            update(memberships)
            .where(memberships.c.user_id == user_id, memberships.c.organization_id == org_id)
            .values(role=role)
        )
    return str(current)


@router.post("/users/{user_id}/role")
async def set_role(request: Request, viewer: IsOwner, user_id: int) -> Response:
    form = await request.form()
    role = str(form.get("role", ""))
    store = store_of(request)
    old = await run_in_threadpool(change_role, store, viewer.org_id, user_id, role)
    listed = await run_in_threadpool(members, store, viewer.org_id)
    email = next((m["email"] for m in listed if m["id"] == user_id), str(user_id))
    await run_in_threadpool(
        audit_now, store, viewer, request, "user.role", email, {"from": old, "to": role}
    )
    return redirect(request, url("/users", viewer), f"{email} is now {role}.")


def remove_member(store: Store, org_id: int, user_id: int) -> str:
    """Take a user out of the organization and end every session of theirs; a user left in
    no organization is deleted. Returns their e-mail address. The last owner stays."""
    with store.write() as conn:
        row = conn.execute(
            select(memberships.c.role, users.c.email)
            .join(users, users.c.id == memberships.c.user_id)
            .where(memberships.c.user_id == user_id, memberships.c.organization_id == org_id)
        ).first()
        if row is None:
            raise UiError(404, "No such member of this organization.")
        if row.role == "owner":
            owners = conn.execute(
                select(func.count()).where(
                    memberships.c.organization_id == org_id, memberships.c.role == "owner"
                )
            ).scalar_one()
            if owners <= 1:
                raise UiError(409, "The organization needs an owner: make someone else one first.")
        conn.execute(
            delete(memberships).where(
                memberships.c.user_id == user_id, memberships.c.organization_id == org_id
            )
        )
        end_user_sessions(conn, user_id)
        others = conn.execute(
            select(func.count()).where(memberships.c.user_id == user_id)
        ).scalar_one()
        if not others:
            conn.execute(delete(users).where(users.c.id == user_id))
    return str(row.email)


@router.post("/users/{user_id}/remove")
async def remove_user(request: Request, viewer: IsOwner, user_id: int) -> Response:
    if user_id == viewer.user_id:
        raise UiError(409, "You cannot remove yourself; another owner can.")
    store = store_of(request)
    email = await run_in_threadpool(remove_member, store, viewer.org_id, user_id)
    await run_in_threadpool(audit_now, store, viewer, request, "user.remove", email)
    return redirect(request, url("/users", viewer), f"{email} is removed and signed out.")
