"""The message log per delivery in headless Chromium against the real pipeline: one row per
delivery with its last reply and bounce category, a match count, filters by reply text,
category and MX host; the API and the CSV export answer the same."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from postbode.store.schema import deliveries
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")


def _status(pb: Postbode, recipient: str) -> str | None:
    with pb.store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()


def test_the_log_lists_deliveries_and_filters_by_reply_category_and_mx(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(
        Rule.rcpt("bob@dest.test", "550 5.1.1 <bob@dest.test>: No such user here"),
        Rule.rcpt("cy@dest.test", "451 4.7.1 Greylisted, try again in 10 minutes"),
    )
    postbode.send(["ann@dest.test", "bob@dest.test", "cy@dest.test"], "Three ways")
    wait_for(
        lambda: (
            (_status(postbode, "ann@dest.test"), _status(postbode, "bob@dest.test"))
            == ("delivered", "bounced")
            and _status(postbode, "cy@dest.test") == "deferred"
        )
    )
    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/messages")
    expect(page.locator(".match-count")).to_have_text("3 deliveries match")
    rows = page.locator("tr.log-row")
    expect(rows).to_have_count(3)
    bob = page.locator("tr.log-row", has_text="bob@dest.test")
    expect(bob).to_contain_text("550 5.1.1")
    expect(bob).to_contain_text("user unknown")
    expect(bob.locator(".badge")).to_have_text("bounced")

    page.fill("input[name=reply]", "greylisted")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".match-count")).to_have_text("1 delivery matches")
    expect(page.locator("tr.log-row")).to_have_count(1)
    expect(page.locator("tr.log-row")).to_contain_text("cy@dest.test")

    page.goto(f"{postbode.base}/messages")
    page.select_option("select[name=category]", "user_unknown")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("tr.log-row")).to_have_count(1)
    expect(page.locator("tr.log-row")).to_contain_text("bob@dest.test")

    page.goto(f"{postbode.base}/messages?mx={postbode.sink.host}&status=delivered")
    expect(page.locator("tr.log-row")).to_have_count(1)
    expect(page.locator("tr.log-row")).to_contain_text("ann@dest.test")

    export = page.request.get(f"{postbode.base}/messages/export.csv?reply=no+such+user")
    found = list(csv.DictReader(io.StringIO(export.text())))
    assert [(r["recipient"], r["bounce_category"]) for r in found] == [
        ("bob@dest.test", "user_unknown")
    ]

    api = page.request.get(
        f"{postbode.base}/api/v1/messages?reply=greylisted",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    ).json()
    (message,) = api["data"]
    matched = [r["email"] for r in message["recipients"] if r["matched"]]
    assert matched == ["cy@dest.test"]
    cy = next(r for r in message["recipients"] if r["email"] == "cy@dest.test")
    assert cy["last_reply"].startswith("451 4.7.1")
    bad = page.request.get(
        f"{postbode.base}/api/v1/messages?category=exploded",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    )
    assert bad.status == 422 and bad.json()["error"]["field"] == "category"
    assert watch.errors == []


def test_on_a_phone_log_and_queue_rows_are_cards(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(Rule.rcpt("slow@dest.test", "451 4.7.1 Greylisted, try later"))
    postbode.send(["fast@dest.test", "slow@dest.test"], "On the road")
    wait_for(lambda: _status(postbode, "slow@dest.test") == "deferred")
    page, watch = open_page(postbode.base, "admin@org.test", viewport={"width": 390, "height": 844})
    for path, row in (("/messages", "tr.log-row"), ("/queue", "table.queue-table tbody tr")):
        page.goto(f"{postbode.base}{path}")
        first = page.locator(row).first
        expect(first).to_be_visible()
        # A card: as wide as the screen allows, no header row, nothing to scroll sideways.
        box = first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        assert page.locator("thead").first.is_hidden()
        overflow = page.evaluate(
            "[...document.querySelectorAll('.scroll')].map(e => e.scrollWidth - e.clientWidth)"
        )
        assert all(o <= 0 for o in overflow), (path, overflow)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert watch.errors == []
