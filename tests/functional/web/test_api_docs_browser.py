"""/api/docs in headless Chromium, with no network beyond this host: the vendored Swagger UI
renders the whole API (native, management and compatible APIs) without CSP violations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from playwright.sync_api import Page

from .conftest import Postbode, Watch


def test_api_docs_render_offline(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base)
    outside: list[str] = []

    def only_this_host(route: Any) -> None:
        url = route.request.url
        if url.startswith(postbode.base):
            route.continue_()
        else:  # a CDN or any other host: the page must not need it
            outside.append(url)
            route.abort()

    page.route("**/*", only_this_host)
    page.goto(f"{postbode.base}/api/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    for expected in (
        "/api/v1/messages",
        "/api/v1/apps",
        "/api/v1/apps/{app}/domains/{domain}/rotate-dkim",
        "/compat/postmark/email",
        "/compat/sendgrid/v3/mail/send",
        "/compat/mailgun/v3/{domain}/messages",
    ):
        assert any(p.replace("\u200b", "") == expected for p in paths), expected
    assert outside == []
    assert watch.errors == [] and watch.csp_violations() == []
