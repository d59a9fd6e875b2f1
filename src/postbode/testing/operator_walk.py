"""The operator's minute in a browser: from the dashboard, click a dip, land on its filtered
log, open a bounced delivery and read its reply; each page's server time from its
Server-Timing header. Shared by the browser test and benchmarks/search_scale.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Page, Response, expect

from postbode.web.timing import server_ms


@dataclass(frozen=True)
class Step:
    """One page of the walk: what it was, its URL and the server's time for it (ms)."""

    name: str
    url: str
    server_ms: float | None


def _document(page: Page, action: Callable[[], object]) -> Response:
    """The document response a navigation started by `action` got."""
    with page.expect_response(lambda r: r.request.resource_type == "document") as info:
        action()
    return info.value


def _step(name: str, answer: Response) -> Step:
    return Step(name, answer.url, server_ms(answer.headers.get("server-timing")))


def walk(page: Page, base: str, tag: str, reply: str, dashboard: str = "range=24h") -> list[Step]:
    """Walk from the dashboard (`dashboard`: its query string) through the dip of `tag` to a
    bounced delivery whose reply contains `reply`; fails (AssertionError, or Playwright's
    timeout) where the operator would be stuck."""
    steps = []
    answer = _document(page, lambda: page.goto(f"{base}/dashboard?{dashboard}"))
    steps.append(_step("dashboard", answer))
    page.wait_for_function("document.body.dataset.chart === 'drawn'")

    dip = page.locator(".peak-list li.peak-volume_drop").filter(has_text=tag).first
    expect(dip).to_be_visible()
    answer = _document(page, lambda: dip.get_by_role("link").click())
    page.wait_for_url("**/messages?**")
    query = parse_qs(urlsplit(page.url).query)
    assert query.get("tag") == [tag], page.url
    assert "since" in query and "until" in query, page.url
    steps.append(_step("dip → log", answer))

    bounced = page.locator("tr.log-row").filter(has=page.locator(".badge.status-bounced")).first
    expect(bounced).to_be_visible()
    answer = _document(page, lambda: bounced.locator("td.subject a").click())
    page.wait_for_url("**/messages/*")
    steps.append(_step("bounced message", answer))
    row = page.locator("#recipients tr").filter(has=page.locator(".badge.status-bounced")).first
    expect(row.locator("td.reply")).to_contain_text(reply)
    return steps
