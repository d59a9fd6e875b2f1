"""What an operator found wrong, in headless Chromium against the real pipeline: the log's
filters match one delivery (page, CSV and API), unknown paths answer the styled page, the
timeline and the audit log print readable values, the secret pages say what is kept."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from postbode.store.schema import deliveries, messages
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")


def _statuses(pb: Postbode) -> dict[tuple[str, str], str]:
    with pb.store.read() as conn:
        rows = conn.execute(
            select(messages.c.subject, deliveries.c.recipient, deliveries.c.status).join(
                messages, messages.c.id == deliveries.c.message_id
            )
        ).all()
    return {(r.subject, r.recipient): r.status for r in rows}


def _two_messages(pb: Postbode) -> None:
    """`Mixed`: ann delivered, bob bounced. `Ann bounced`: ann bounced."""
    pb.sink.script.add(
        Rule.rcpt("bob@dest.test", "550 5.1.1 No such user bob"),
        Rule.rcpt("ann@dest.test", "250 2.1.5 OK", "550 5.2.1 Mailbox disabled"),
    )
    pb.send(["ann@dest.test", "bob@dest.test"], "Mixed")
    wait_for(
        lambda: (
            _statuses(pb).get(("Mixed", "ann@dest.test")) == "delivered"
            and _statuses(pb).get(("Mixed", "bob@dest.test")) == "bounced"
        )
    )
    pb.send(["ann@dest.test"], "Ann bounced")
    wait_for(lambda: _statuses(pb).get(("Ann bounced", "ann@dest.test")) == "bounced")


def test_log_filters_match_the_same_delivery(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    _two_messages(postbode)
    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/messages?recipient=ann@dest.test&status=bounced")
    expect(page.locator("body")).to_contain_text("Ann bounced")
    expect(page.locator("body")).not_to_contain_text("Mixed")

    # The CSV export answers the same question.
    answer = page.request.get(
        f"{postbode.base}/messages/export.csv?recipient=ann@dest.test&status=bounced"
    )
    assert answer.status == 200
    subjects = [r["subject"] for r in csv.DictReader(io.StringIO(answer.text()))]
    assert subjects == ["Ann bounced"]

    # And the API.
    api = page.request.get(
        f"{postbode.base}/api/v1/messages?recipient=ann@dest.test&status=bounced",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    )
    assert [m["subject"] for m in api.json()["data"]] == ["Ann bounced"]

    # Without the status, both messages to ann are there.
    page.goto(f"{postbode.base}/messages?recipient=ann@dest.test")
    expect(page.locator("body")).to_contain_text("Mixed")
    expect(page.locator("body")).to_contain_text("Ann bounced")
    assert watch.errors == []


def test_unknown_paths_answer_a_page_for_browsers_and_json_for_programs(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base)
    answer = page.goto(f"{postbode.base}/no/such/page")
    assert answer is not None and answer.status == 404
    assert answer.headers["content-type"].startswith("text/html")
    expect(page.locator("h1")).to_have_text("Not found")
    expect(page.locator(".error-page a")).to_have_text("Sign in")
    assert page.locator("link[rel=stylesheet]").count() == 1

    icon = page.request.get(f"{postbode.base}/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")

    api = page.request.get(f"{postbode.base}/api/v1/nothing", headers={"Accept": "text/html"})
    assert api.status == 404 and api.json()["error"]["code"] == "not_found"
    program = page.request.get(f"{postbode.base}/no/such/page")
    assert program.status == 404 and program.json()["error"]["code"] == "not_found"

    signed, _ = open_page(postbode.base, "viewer@org.test")
    signed.goto(f"{postbode.base}/nowhere")
    expect(signed.locator(".error-page a")).to_have_text("Back to the dashboard")
    assert watch.errors == []


def test_timeline_and_audit_log_read_as_words(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(Rule.rcpt("gone@dest.test", "550 5.1.1 No such user"))
    postbode.send(["gone@dest.test"], "Gone")
    wait_for(lambda: _statuses(postbode).get(("Gone", "gone@dest.test")) == "bounced")
    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/messages?subject=Gone")
    page.get_by_role("link", name="Gone", exact=True).click()
    timeline = page.locator("ol.timeline")
    expect(timeline).to_contain_text("delivery.bounced")
    text = timeline.inner_text()
    for python in ("True", "False", "None", "{'", "['"):
        assert python not in text, (python, text)

    # A webhook created in the UI: its audit entry lists event types without a Python list.
    page.goto(f"{postbode.base}/settings/apps/shop/webhooks")
    page.fill("input[name=url]", "https://hooks.shop.test/postbode")
    page.locator("input[name=event_types][value='delivery.bounced']").check()
    page.locator("input[name=event_types][value='delivery.delivered']").check()
    page.get_by_role("button", name="Create webhook").click()
    warning = page.locator(".secret-once .flash")
    expect(warning).to_contain_text("keeps it encrypted")
    expect(warning).not_to_contain_text("hash")
    page.goto(f"{postbode.base}/audit")
    row = page.locator("tr", has_text="webhook.create")
    expect(row).to_contain_text(re.compile(r"delivery\.\w+, delivery\.\w+"))
    assert "['" not in row.inner_text()
    assert watch.errors == []


@pytest.mark.parametrize("path", ["/dashboard", "/messages", "/queue"])
def test_narrow_screens_neither_overflow_nor_hide_navigation(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]], path: str
) -> None:
    postbode.send(["ann@dest.test"], "A message", headers={"X-Postbode-Tag": "a-rather-long-tag"})
    wait_for(lambda: _statuses(postbode).get(("A message", "ann@dest.test")) == "delivered")
    page, watch = open_page(postbode.base, "owner@org.test", viewport={"width": 390, "height": 844})
    page.goto(f"{postbode.base}{path}")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    links = page.locator("nav.nav a")
    assert links.count() >= 6
    for i in range(links.count()):
        box = links.nth(i).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (
            links.nth(i).inner_text(),
            box,
        )
    assert watch.errors == []


def test_every_dns_record_value_has_a_copy_button(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(
        postbode.base, "owner@org.test", permissions=["clipboard-read", "clipboard-write"]
    )
    page.goto(f"{postbode.base}/settings/apps/shop/domains")
    rows = page.locator("table.dns tbody tr")
    assert rows.count() >= 4
    for i in range(rows.count()):
        value = rows.nth(i).locator("td.dns-value code").inner_text().strip()
        rows.nth(i).get_by_role("button", name="Copy").click()
        expect(rows.nth(i).get_by_role("button")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == value
    assert watch.errors == []
