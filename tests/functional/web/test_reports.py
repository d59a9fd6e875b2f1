"""The weekly report: e-mailed through Postbode itself to a subscribed user, arriving at the
sink once per period with figures that match the store; its CSV through the API."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from postbode.stats import queries, reports
from postbode.store.schema import (
    deliveries,
    memberships,
    messages,
    report_subscriptions,
    users,
    utcnow,
)
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")


def _count(pb: Postbode, *conds: object) -> int:
    with pb.store.read() as conn:
        return int(
            conn.execute(select(func.count()).select_from(deliveries).where(*conds)).scalar_one()
        )  # type: ignore[arg-type]


def test_the_weekly_report_arrives_with_the_stores_figures(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(Rule.rcpt("gone@bounce.test", "550 5.1.1 No such user"))
    postbode.send(["ann@dest.test", "bob@dest.test"], "Order 1")
    postbode.send(["cy@dest.test", "gone@bounce.test"], "Order 2")
    postbode.sink.wait_for_sync(2, timeout=20)
    wait_for(lambda: _count(postbode, deliveries.c.status.in_(("delivered", "bounced"))) == 4)

    with postbode.store.read() as conn:
        owner = conn.execute(
            select(users.c.id, memberships.c.organization_id)
            .join(memberships, memberships.c.user_id == users.c.id)
            .where(users.c.email == "owner@org.test")
        ).one()
    reports.subscribe(postbode.store, owner.organization_id, owner.id, "weekly")

    # Next Monday, just after midnight: this week is the last complete one.
    now = utcnow()
    monday = (now + timedelta(days=7 - now.weekday())).replace(
        hour=0, minute=30, second=0, microsecond=0
    )
    # The figures, from the store, as they stand when the report is made.
    period = reports.last_complete("weekly", monday)
    with postbode.store.read() as conn:
        app_ids = list(conn.execute(select(messages.c.app_id).distinct()).scalars())
    summary = queries.summary(postbode.store, app_ids, since=period.since, until=period.until)
    received = summary.totals["message.received"]
    assert received == 2
    delivered = _count(postbode, deliveries.c.status == "delivered")
    bounced = _count(postbode, deliveries.c.status == "bounced")
    assert reports.send_due(postbode.store, "reports@postbode.test", now=monday) == 1
    assert reports.send_due(postbode.store, "reports@postbode.test", now=monday) == 0  # once

    def the_report() -> list[object]:
        return [m for m in postbode.sink.messages if "weekly report" in str(m.message["Subject"])]

    wait_for(lambda: len(the_report()) == 1)
    (mail,) = the_report()
    assert mail.rcpt_tos == ("owner@org.test",)  # type: ignore[attr-defined]
    body = mail.message.get_content().replace("\r\n", "\n")  # type: ignore[attr-defined]

    def row(name: str) -> list[str]:
        found = re.search(rf"^{name}\s+([\d,]+)\s+([\d,]+)$", body, re.M)
        assert found, (name, body)
        return [found.group(1).replace(",", ""), found.group(2)]

    assert row("received") == [str(received), "0"]
    assert row("delivered")[0] == str(delivered) == "3"
    assert row("bounced")[0] == str(bounced) == "1"
    rate = summary.rates.delivery_rate
    assert rate is not None and "delivery rate" in body
    assert f"{rate * 100:.1f} %" in body
    assert "bounce.test: 1" in body and "user_unknown: 1" in body

    # The same report as CSV through the API (the last complete week, here: empty or not).
    page, _ = open_page(postbode.base)
    api = page.request.get(
        f"{postbode.base}/api/v1/stats/export?format=csv&period=weekly",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    )
    assert api.status == 200 and api.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(api.text())))
    assert rows[0] == ["section", "name", "value", "previous"]
    assert rows[3][:2] == ["volume", "received"]
    bad = page.request.get(
        f"{postbode.base}/api/v1/stats/export?format=xml",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    )
    assert bad.status == 422 and bad.json()["error"]["field"] == "format"


def test_the_reports_page_its_csv_and_asking_for_it_by_mail(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base, "viewer@org.test")
    page.get_by_role("link", name="Reports", exact=True).click()
    expect(page.locator("h1")).to_have_text("Reports")
    expect(page.locator("table.report-figures")).to_contain_text("delivery rate")
    page.get_by_role("link", name="monthly").click()
    expect(page.locator(".page-head .muted")).to_contain_text("month before")
    csv_answer = page.request.get(f"{postbode.base}/reports/export.csv?period=monthly")
    assert csv_answer.status == 200
    assert csv_answer.text().startswith("section,name,value,previous")
    page.get_by_role("button", name="E-mail me this report every month").click()
    expect(page.locator(".flash")).to_contain_text("monthly report by e-mail")
    with postbode.store.read() as conn:
        subs = conn.execute(
            select(report_subscriptions.c.period, users.c.email).join(
                users, users.c.id == report_subscriptions.c.user_id
            )
        ).all()
    assert [(s.period, s.email) for s in subs] == [("monthly", "viewer@org.test")]
    assert watch.errors == []
