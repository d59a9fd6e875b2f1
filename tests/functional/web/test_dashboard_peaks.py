"""Peaks and dips on the dashboard in headless Chromium: a seeded silence of one tag in the
hour just ended is raised (app.alert volume_drop), marked on the chart and listed with a link
to that hour's log; clicking a bucket of the chart opens the log of that bucket."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import insert

from postbode.stats import anomalies
from postbode.stats.queries import bucket_floor
from postbode.store.schema import stat_counters, utcnow

from .conftest import Postbode, Watch

pytestmark = pytest.mark.xdist_group("browser")


def test_a_dip_is_marked_on_the_chart_and_opens_its_log(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    now = utcnow()
    last_hour = bucket_floor(now, anomalies.HOUR) - anomalies.HOUR
    rows = []
    for h in range(1, 24 * 8):
        at = last_hour - timedelta(hours=h)
        for tag, n in (("password-reset", 40), ("order", 80)):
            rows.append(
                {
                    "app_id": postbode.shop.app_id,
                    "stream": "transactional",
                    "tag": tag,
                    "bucket": at,
                    "event_type": "message.received",
                    "count": n + h % 5,
                    "bot_count": 0,
                }
            )
    rows.append(  # the hour just ended: orders as usual, not one password reset
        {
            "app_id": postbode.shop.app_id,
            "stream": "transactional",
            "tag": "order",
            "bucket": last_hour + timedelta(minutes=20),
            "event_type": "message.received",
            "count": 81,
            "bot_count": 0,
        }
    )
    with postbode.store.write() as conn:
        conn.execute(insert(stat_counters), rows)
    raised = anomalies.check(postbode.store)
    assert [(f.kind, f.tag) for f in raised] == [("volume_drop", "password-reset")]

    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/dashboard?app=shop&range=24h")
    page.wait_for_function("document.body.dataset.chart === 'drawn'")
    marks = page.evaluate("JSON.parse(document.getElementById('chart-data').textContent).marks")
    assert [(m["kind"], m["tag"]) for m in marks] == [("volume_drop", "password-reset")]
    peak = page.locator(".peak-list li")
    expect(peak).to_have_count(1)
    expect(peak).to_contain_text("volume_drop")
    expect(peak).to_contain_text("password-reset")
    peak.get_by_role("link").click()
    page.wait_for_url("**/messages?**")
    query = parse_qs(urlsplit(page.url).query)
    assert query["tag"] == ["password-reset"]
    assert query["since"] == [last_hour.strftime("%Y-%m-%dT%H:%M")]

    # A click on the chart opens the log of the bucket under the pointer.
    page.goto(f"{postbode.base}/dashboard?app=shop&range=24h")
    page.wait_for_function("document.body.dataset.chart === 'drawn'")
    box = page.locator("#chart-card canvas").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
    page.wait_for_url("**/messages?**")
    query = parse_qs(urlsplit(page.url).query)
    since, until = query["since"][0], query["until"][0]
    assert since < until and query["app"] == ["shop"]
    expect(page.locator("h1")).to_have_text("Messages")
    assert watch.errors == [] and watch.csp_violations() == []
