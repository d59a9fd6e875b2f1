"""Signing in and out: first run, the session cookie, throttling, logout, stale sessions."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select, update

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import audit_log, login_attempts, users

from .conftest import PASSWORD, Browser, Org


def test_first_run_creates_the_owner_then_is_gone(sqlite_store: Store, make_ui: Callable) -> None:
    _, browser = make_ui(sqlite_store)
    b: Browser = browser()
    assert b.get("/dashboard", follow_redirects=False).headers["location"].startswith("/login")
    assert b.get("/login", follow_redirects=False).headers["location"] == "/setup"
    page = b.get("/setup")
    assert page.status_code == 200 and "Create the owner" in page.text
    differ = b.post(
        "/setup",
        {"email": "me@org.test", "password": PASSWORD, "password_confirm": "something else"},
    )
    assert differ.status_code == 422 and "The two passwords differ" in differ.text
    made = b.post(
        "/setup", {"email": "Me@Org.test", "password": PASSWORD, "password_confirm": PASSWORD}
    )
    assert made.status_code == 303 and made.headers["location"] == "/"
    assert b.get("/dashboard").status_code == 200  # signed in straight away
    with sqlite_store.read() as conn:
        role = conn.execute(select(users.c.email)).scalar_one()
        action = conn.execute(select(audit_log.c.action, audit_log.c.actor)).one()
    assert role == "me@org.test" and tuple(action) == ("setup.owner", "me@org.test")
    # Once someone exists the first-run page is closed, to everyone.
    stranger = browser()
    assert stranger.get("/setup", follow_redirects=False).headers["location"] == "/login"
    stranger.get("/login")
    again = stranger.post(
        "/setup", {"email": "x@org.test", "password": PASSWORD, "password_confirm": PASSWORD}
    )
    assert again.headers["location"] == "/login"
    with sqlite_store.read() as conn:
        assert conn.execute(select(users.c.id)).scalars().all() == [1]


def test_login_sets_a_signed_httponly_lax_cookie(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    b.get("/login?next=/queue")
    response = b.post("/login", {"email": "Admin@Org.test", "password": PASSWORD, "next": "/queue"})
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("pb_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    assert b.get("/queue").status_code == 200
    # A tampered cookie is no session.
    value = b.client.cookies["pb_session"]
    b.client.cookies.delete("pb_session")
    b.client.cookies.set("pb_session", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert b.get("/queue", follow_redirects=False).status_code == 303


def test_the_cookie_is_secure_over_https(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser("https://testserver")
    b.get("/login")
    response = b.post("/login", {"email": "admin@org.test", "password": PASSWORD})
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("pb_session="))
    assert "Secure" in cookie


def test_next_never_leaves_the_site(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    for target in ("https://evil.test/", "//evil.test/x", "/\\evil.test", "javascript:alert(1)"):
        b: Browser = browser()
        b.get("/login")
        response = b.post(
            "/login", {"email": "admin@org.test", "password": PASSWORD, "next": target}
        )
        assert response.headers["location"] == "/", target


def test_wrong_password_is_refused_and_counted(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    b: Browser = browser()
    b.get("/login")
    response = b.post("/login", {"email": "admin@org.test", "password": "wrong"})
    assert response.status_code == 401
    assert "do not match" in response.text and "pb_session" not in b.client.cookies
    with store.read() as conn:
        keys = sorted(conn.execute(select(login_attempts.c.key)).scalars())
    assert keys == ["email:admin@org.test", "ip:testclient"]


def test_five_failures_per_address_lock_it_for_a_while(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    b: Browser = browser()
    b.get("/login")
    for _ in range(5):
        assert b.post("/login", {"email": "admin@org.test", "password": "nope"}).status_code == 401
    locked = b.post("/login", {"email": "admin@org.test", "password": PASSWORD})
    assert locked.status_code == 429 and "Too many failed sign-ins" in locked.text
    assert 0 < int(locked.headers["retry-after"]) <= 15 * 60
    assert "pb_session" not in b.client.cookies  # even the right password waits
    # Another address from the same place is still let in (the IP limit is higher).
    assert b.post("/login", {"email": "viewer@org.test", "password": PASSWORD}).status_code == 303
    # Failures older than the window no longer count.
    with store.write() as conn:
        conn.execute(update(login_attempts).values(at=login_attempts.c.at - 16 * 60))
    other: Browser = browser()
    other.get("/login")
    assert (
        other.post("/login", {"email": "admin@org.test", "password": PASSWORD}).status_code == 303
    )


def test_ten_failures_from_one_address_lock_the_ip(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    b.get("/login")
    for i in range(10):
        b.post("/login", {"email": f"nobody{i}@org.test", "password": "nope"})
    response = b.post("/login", {"email": "owner@org.test", "password": PASSWORD})
    assert response.status_code == 429


def test_logout_is_a_post_and_ends_the_session(admin: Browser) -> None:
    assert admin.client.get("/logout").status_code == 405
    response = admin.post("/logout")
    assert response.headers["location"] == "/login"
    assert admin.get("/dashboard", follow_redirects=False).status_code == 303


def test_a_password_change_ends_older_sessions(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    b: Browser = browser()
    b.login("admin@org.test")
    with store.write() as conn:
        conn.execute(
            update(users)
            .where(users.c.email == "admin@org.test")
            .values(password_hash=tenancy._hasher.hash("a new password"))
        )
    assert b.get("/dashboard", follow_redirects=False).status_code == 303


def test_htmx_requests_are_told_where_to_sign_in(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    response = b.get("/dashboard/live", headers={"HX-Request": "true"}, follow_redirects=False)
    assert response.headers["hx-redirect"].startswith("/login")


def test_a_user_without_an_organization_cannot_sign_in(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    from sqlalchemy import delete

    from postbode.store.schema import memberships

    with store.write() as conn:
        conn.execute(delete(memberships).where(memberships.c.user_id == 3))
    b: Browser = browser()
    b.get("/login")
    assert b.post("/login", {"email": "viewer@org.test", "password": PASSWORD}).status_code == 403
