"""Every UI POST needs this session's CSRF token; every UI response carries security headers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from postbode.store.engine import Store
from postbode.store.schema import audit_log
from postbode.testing.factories import make_queued_message
from postbode.web.ui import router as ui_router
from postbode.web.ui.core import APP_CSP

from .conftest import Browser, Org

FIXED_ID = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")  # the same in every xdist worker


def _post_paths() -> list[str]:
    """Every POST route of the UI, its path parameters filled in."""
    found = []
    for route in _routes(ui_router):
        if "POST" in getattr(route, "methods", set()):
            path = route.path
            path = re.sub(r"\{[a-z_]*id\}", str(FIXED_ID), path)
            path = path.replace("{hook_id}", "1").replace("{credential_id}", "1")
            path = path.replace("{user_id}", "1").replace("{name}", "shop")
            path = path.replace("{action}", "retry")
            found.append(path)
    return found


def _routes(router: object) -> list[object]:
    routes = []
    for route in getattr(router, "routes", []):
        inner = getattr(route, "router", None) or getattr(route, "original_router", None)
        routes.extend(_routes(inner) if inner is not None else [route])
    return routes


POST_PATHS = _post_paths()


def test_the_ui_has_post_routes_to_check() -> None:
    assert len(POST_PATHS) >= 20, POST_PATHS
    assert "/login" in POST_PATHS and "/queue/apply" in POST_PATHS


@pytest.mark.parametrize("path", POST_PATHS)
def test_a_post_without_the_token_is_refused(
    ui: tuple[Store, Org, Callable], owner: Browser, path: str
) -> None:
    store = ui[0]
    with store.read() as conn:
        before = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
    response = owner.client.post(path, data={"email": "x@org.test"}, follow_redirects=False)
    assert response.status_code == 403, (path, response.status_code)
    assert "security token" in response.text
    forged = owner.client.post(path, data={"csrf_token": "forged"}, follow_redirects=False)
    assert forged.status_code == 403
    with store.read() as conn:
        after = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
    assert after == before  # nothing happened


def test_another_sessions_token_is_refused(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    alice: Browser = browser()
    alice.login("admin@org.test")
    mallory: Browser = browser()
    mallory.login("viewer@org.test")
    stolen = mallory.token
    response = alice.client.post(
        "/suppressions", data={"csrf_token": stolen, "email": "x@y.test"}, follow_redirects=False
    )
    assert response.status_code == 403
    ok = alice.post("/suppressions", {"email": "x@y.test"})
    assert ok.status_code == 303


def test_the_token_in_a_header_works_too(admin: Browser) -> None:
    response = admin.client.post(
        "/suppressions",
        data={"email": "x@y.test"},
        headers={"X-CSRF-Token": admin.token},
        follow_redirects=False,
    )
    assert response.status_code == 303


def test_a_cross_site_origin_is_refused_even_with_the_token(admin: Browser) -> None:
    for origin in ("https://evil.test", "null"):
        response = admin.post("/suppressions", {"email": "x@y.test"}, headers={"Origin": origin})
        assert response.status_code == 403, origin
    same = admin.post(
        "/suppressions", {"email": "x@y.test"}, headers={"Origin": "http://testserver"}
    )
    assert same.status_code == 303


def test_the_login_form_needs_its_token(ui: tuple[Store, Org, Callable]) -> None:
    _, _, browser = ui
    b: Browser = browser()
    response = b.client.post(
        "/login", data={"email": "admin@org.test", "password": "x"}, follow_redirects=False
    )
    assert response.status_code == 403


def test_pages_carry_security_headers(owner: Browser, ui: tuple[Store, Org, Callable]) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["a@dest.test"])
    paths = (
        "/dashboard",
        "/messages",
        f"/messages/{message_id}",
        "/queue",
        "/settings",
        "/login",
        f"/messages/{uuid.uuid4()}",
        "/messages/export.csv",
    )
    for path in paths:
        headers = owner.get(path).headers
        assert headers["content-security-policy"] == APP_CSP, path
        assert "'unsafe-inline'" not in APP_CSP and "'unsafe-eval'" not in APP_CSP
        assert "frame-ancestors 'none'" in APP_CSP
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"
        assert headers["cache-control"] == "no-store"


def test_the_preview_is_frameable_by_self_only_and_runs_nothing(
    owner: Browser, ui: tuple[Store, Org, Callable]
) -> None:
    store, org, _ = ui
    raw = (
        b"Subject: hi\r\nContent-Type: text/html\r\n\r\n"
        b"<script>window.__pwned=1</script><img src=https://tracker.test/p.gif>"
    )
    message_id, _ = make_queued_message(store, org.shop.app_id, ["a@dest.test"], raw=raw)
    response = owner.get(f"/messages/{message_id}/preview")
    csp = response.headers["content-security-policy"]
    assert csp.startswith("default-src 'none'; style-src 'unsafe-inline'; img-src data:;")
    assert "frame-ancestors 'self'" in csp and csp.endswith("sandbox")
    assert "script-src" not in csp
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers["referrer-policy"] == "no-referrer"
    remote = owner.get(f"/messages/{message_id}/preview?remote=1")
    assert "img-src data: https: http:;" in remote.headers["content-security-policy"]
    page = owner.get(f"/messages/{message_id}")
    assert '<iframe class="preview" sandbox="" ' in page.text
    assert f'src="/messages/{message_id}/preview"' in page.text
    raw_source = owner.get(f"/messages/{message_id}/raw")
    assert raw_source.headers["content-type"] == "message/rfc822"
    assert raw_source.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert raw_source.content == raw


def test_static_files_are_not_sniffed(owner: Browser) -> None:
    response = owner.get("/static/vendor/htmx.min.js")
    assert response.status_code == 200
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "javascript" in response.headers["content-type"]


def test_the_pre_login_token_is_refused_while_signed_in(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    """A token bound to a pre-login visit (which another site can obtain and plant) never
    stands in for the session's own."""
    _, _, browser = ui
    stranger: Browser = browser()
    stranger.get("/login")
    admin.client.cookies.set("pb_pre", stranger.client.cookies["pb_pre"])
    refused = admin.client.post(
        "/settings/apps",
        data={"csrf_token": stranger.token, "name": "planted"},
        follow_redirects=False,
    )
    assert refused.status_code == 403
    # The session's own token still works.
    assert admin.post("/settings/apps", {"name": "mine"}).status_code == 200  # its secrets


def test_a_post_without_any_session_is_refused_before_its_body_is_read(
    ui: tuple[Store, Org, Callable],
) -> None:
    _, _, browser = ui
    b: Browser = browser()
    response = b.client.post(
        "/users", data={"csrf_token": "x", "email": "a@b.test"}, follow_redirects=False
    )
    assert response.status_code == 403
