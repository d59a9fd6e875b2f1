"""The dashboard's "today" and custom ranges in the organisation's time zone, in headless
Chromium: an owner sets the zone; "today" starts at its midnight; a custom range is read in it
and kept by the live refresh; a bad zone or range is refused with a notice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Page, expect

from postbode.store.schema import utcnow

from .conftest import Postbode, Watch

pytestmark = pytest.mark.xdist_group("browser")


def test_today_and_a_custom_range_in_the_organisations_time_zone(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/settings")
    page.fill("input[name=time_zone]", "Mars/Olympus_Mons")
    page.get_by_role("button", name="Save time zone").click()
    expect(page.locator(".flash")).to_contain_text("Unknown time zone")
    page.fill("input[name=time_zone]", "Pacific/Auckland")
    page.get_by_role("button", name="Save time zone").click()
    expect(page.locator(".flash")).to_contain_text("Pacific/Auckland")

    page.goto(f"{postbode.base}/dashboard")
    page.get_by_role("link", name="today", exact=True).click()
    expect(page.locator(".span-label")).to_have_text("today (Pacific/Auckland)")
    # The chart starts at midnight in Auckland (its labels are Auckland's times).
    page.wait_for_function("document.body.dataset.chart === 'drawn'")
    labels = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent).labels")
    assert labels[0] == "00:00"

    # A custom range: yesterday 09:00 to 17:00, Auckland time.
    day = (utcnow().astimezone(ZoneInfo("Pacific/Auckland")) - timedelta(days=1)).date()
    page.fill("form.custom-range input[name=since]", f"{day}T09:00")
    page.fill("form.custom-range input[name=until]", f"{day}T17:00")
    page.get_by_role("button", name="Show").click()
    expect(page.locator(".span-label")).to_have_text(
        f"{day} 09:00 to {day} 17:00 (Pacific/Auckland)"
    )
    labels = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent).labels")
    assert labels[0] == "09:00" and len(labels) == 32  # quarter hours
    # The live refresh asks for the same range.
    assert "range=custom" in (page.locator("#live").get_attribute("hx-get") or "")
    bad = page.goto(f"{postbode.base}/dashboard?range=custom&since={day}T17:00&until={day}T09:00")
    assert bad is not None and bad.status == 400
    assert watch.errors == []
