"""Signing in and out: first run, the session cookie, throttling, logout, stale sessions."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import audit_log, login_attempts, users
from postbode.web.app import create_app
from postbode.web.ui import session

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
    assert keys == ["ip:testclient", "pair:admin@org.test|testclient"]


def test_failures_of_an_address_from_one_place_back_off(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    b: Browser = browser()
    b.get("/login")
    for _ in range(session.FREE_FAILURES_PER_PAIR):
        assert b.post("/login", {"email": "admin@org.test", "password": "nope"}).status_code == 401
    waiting = b.post("/login", {"email": "admin@org.test", "password": PASSWORD})
    assert waiting.status_code == 429 and "Too many failed sign-ins" in waiting.text
    assert int(waiting.headers["retry-after"]) == session.BASE_DELAY
    assert "pb_session" not in b.client.cookies  # even the right password waits
    # Another address from the same place is still let in (the IP allows more).
    assert b.post("/login", {"email": "viewer@org.test", "password": PASSWORD}).status_code == 303
    # Once the wait is over, the right password signs in.
    with store.write() as conn:
        conn.execute(update(login_attempts).values(at=login_attempts.c.at - session.BASE_DELAY))
    other: Browser = browser()
    other.get("/login")
    assert (
        other.post("/login", {"email": "admin@org.test", "password": PASSWORD}).status_code == 303
    )


def test_the_wait_doubles_with_each_failure_up_to_a_cap() -> None:
    free = session.FREE_FAILURES_PER_PAIR
    assert session.backoff(free - 1, free) == 0
    assert [session.backoff(free + i, free) for i in range(4)] == [2, 4, 8, 16]
    assert session.backoff(free + 1000, free) == session.MAX_DELAY


def test_many_failures_from_one_ip_slow_that_ip(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    b.get("/login")
    for i in range(session.FREE_FAILURES_PER_IP):
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


# -- sessions kept in the store: revocable ---------------------------------------------------


def _replay(browser: Callable[..., Browser], cookie: str) -> int:
    """Status of /dashboard for a new browser carrying a saved session cookie."""
    thief: Browser = browser()
    thief.client.cookies.set("pb_session", cookie)
    return int(thief.get("/dashboard", follow_redirects=False).status_code)


def test_a_saved_cookie_stops_working_after_logout(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    b.login("admin@org.test")
    saved = b.client.cookies["pb_session"]
    assert _replay(browser, saved) == 200
    b.post("/logout")
    assert _replay(browser, saved) == 303


def test_signing_out_everywhere_ends_every_session(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    laptop: Browser = browser()
    laptop.login("admin@org.test")
    phone: Browser = browser()
    phone.login("admin@org.test")
    assert "2 browsers" in phone.get("/account").text
    response = phone.post("/account/sessions/end")
    assert response.headers["location"] == "/login"
    assert laptop.get("/dashboard", follow_redirects=False).status_code == 303
    assert phone.get("/dashboard", follow_redirects=False).status_code == 303


def test_changing_the_password_ends_the_other_sessions(ui: tuple[Store, Org, Callable]) -> None:
    store, _, browser = ui
    laptop: Browser = browser()
    laptop.login("admin@org.test")
    phone: Browser = browser()
    phone.login("admin@org.test")
    phone.get("/account")
    wrong = phone.post(
        "/account/password",
        {
            "current_password": "not it",
            "password": "a new password",
            "password_confirm": "a new password",
        },
    )
    assert "not right" in phone.flash(wrong)
    changed = phone.post(
        "/account/password",
        {
            "current_password": PASSWORD,
            "password": "a new password",
            "password_confirm": "a new password",
        },
    )
    assert "Password changed" in phone.flash(changed)
    assert phone.get("/dashboard", follow_redirects=False).status_code == 200  # this one stays
    assert laptop.get("/dashboard", follow_redirects=False).status_code == 303
    assert tenancy.verify_user(store, "admin@org.test", "a new password") is not None
    with store.read() as conn:
        actions = set(conn.execute(select(audit_log.c.action)).scalars())
    assert "user.password" in actions


def test_removing_a_user_ends_their_sessions(
    ui: tuple[Store, Org, Callable], owner: Browser
) -> None:
    _, org, browser = ui
    admin: Browser = browser()
    admin.login("admin@org.test")
    owner.get("/users")
    removed = owner.post(f"/users/{org.admin_id}/remove")
    assert "removed and signed out" in owner.flash(removed)
    assert admin.get("/dashboard", follow_redirects=False).status_code == 303
    again: Browser = browser()
    again.get("/login")
    assert (
        again.post("/login", {"email": "admin@org.test", "password": PASSWORD}).status_code == 401
    )
    # The last owner stays; no one removes themselves.
    assert owner.post(f"/users/{org.owner_id}/remove").status_code == 409


def test_a_stranger_far_away_does_not_lock_the_owner_out(
    ui: tuple[Store, Org, Callable], make_ui: Callable, sqlite_store: Store
) -> None:
    settings, _ = make_ui(sqlite_store)

    app = create_app(settings, sqlite_store)
    attacker = Browser(TestClient(app, client=("203.0.113.7", 40000)))
    attacker.get("/login")
    for _ in range(30):
        attacker.post("/login", {"email": "owner@org.test", "password": "guess"})
    assert (
        attacker.post("/login", {"email": "owner@org.test", "password": PASSWORD}).status_code
        == 429
    )
    at_home = Browser(TestClient(app, client=("198.51.100.20", 40000)))
    at_home.get("/login")
    assert (
        at_home.post("/login", {"email": "owner@org.test", "password": PASSWORD}).status_code == 303
    )
    attacker.client.close()
    at_home.client.close()
