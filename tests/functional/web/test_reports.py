"""The weekly report: e-mailed (text and HTML) through Postbode itself to a subscribed user,
arriving at the sink once per period with figures that match the store and an HTML part that
reads on a phone; its CSV through the API; the reports page."""

from __future__ import annotations

import csv
import io
import random
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select, update

from postbode import demo
from postbode.stats import reports
from postbode.store.engine import Store
from postbode.store.schema import (
    app_alerts,
    deliveries,
    events,
    memberships,
    organizations,
    report_subscriptions,
    users,
    utcnow,
)
from postbode.work import registry

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")


def _count(pb: Postbode, *conds: object) -> int:
    with pb.store.read() as conn:
        return int(
            conn.execute(select(func.count()).select_from(deliveries).where(*conds)).scalar_one()
        )  # type: ignore[arg-type]


def _events(store: Store, since: datetime, until: datetime) -> dict[str, int]:
    """Counted events per type in [since, until), people apart from bots, straight from the
    event rows: the report reads counters, this reads what they count."""
    found: dict[str, int] = {}
    with store.read() as conn:
        for row in conn.execute(
            select(events.c.type, events.c.data).where(
                events.c.created_at >= since, events.c.created_at < until
            )
        ):
            data = row.data or {}
            if data.get("repeat"):
                continue
            kind = str(row.type) + (".bot" if data.get("bot") else "")
            found[kind] = found.get(kind, 0) + 1
    return found


def _rate(part: int, whole: int) -> str:
    return "—" if whole <= 0 else f"{min(part, whole) / whole * 100:.1f} %"


def _expected(found: dict[str, int]) -> dict[str, str]:
    delivered = found.get("delivery.delivered", 0)
    bounced = found.get("delivery.bounced", 0)
    settled = delivered + bounced + found.get("delivery.failed", 0)
    opened, clicked = found.get("message.opened", 0), found.get("message.clicked", 0)
    return {
        "received": f"{found.get('message.received', 0):,}",
        "delivered": f"{delivered:,}",
        "bounced": f"{bounced:,}",
        "opened": f"{opened:,}",
        "clicked": f"{clicked:,}",
        "delivery rate": _rate(delivered, settled),
        "bounce rate": _rate(bounced, settled),
        "open rate": _rate(opened, delivered),
        "click rate": _rate(clicked, delivered),
    }


def test_the_weekly_report_arrives_with_the_stores_figures_and_reads_on_a_phone(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    """Sixteen seeded days of an organisation in Auckland; the stats.reports task mails the
    last complete week (local Monday to Monday) through the worker to the sink; every figure
    of both parts matches the event rows; the HTML part fits a 390 px screen in Chromium."""
    store = postbode.store
    zone = ZoneInfo("Pacific/Auckland")
    with store.write() as conn:
        owner = conn.execute(
            select(users.c.id, memberships.c.organization_id)
            .join(memberships, memberships.c.user_id == users.c.id)
            .where(users.c.email == "owner@org.test")
        ).one()
        conn.execute(
            update(organizations)
            .where(organizations.c.id == owner.organization_id)
            .values(time_zone=zone.key)
        )
    seeded = demo.seed(store, messages=1500, app="shop", days=16, rng=random.Random(18))
    assert seeded.app_id == postbode.shop.app_id
    with store.write() as conn:
        # The seeded mail still waiting at the end is not this test's: the worker would send it.
        conn.execute(
            update(deliveries)
            .where(deliveries.c.status.in_(("queued", "deferred")))
            .values(status="cancelled")
        )
    period = reports.last_complete("weekly", utcnow(), zone)
    with store.write() as conn:
        conn.execute(
            app_alerts.insert().values(
                app_id=seeded.app_id,
                kind="bounce_rate",
                figures={},
                created_at=period.until - timedelta(minutes=1),  # Sunday 23:59 in Auckland
            )
        )
    reports.subscribe(store, owner.organization_id, owner.id, "weekly")

    (task,) = [t for t in registry(postbode.settings).tasks if t.name == "stats.reports"]
    assert task.run(store) == 1
    assert task.run(store) == 0  # once a period

    def the_report() -> list[Any]:
        return [m for m in postbode.sink.messages if "weekly report" in str(m.message["Subject"])]

    wait_for(lambda: len(the_report()) == 1)
    (mail,) = the_report()
    assert mail.rcpt_tos == ("owner@org.test",)
    assert mail.message.get_content_type() == "multipart/alternative"
    assert period.key in str(mail.message["Subject"])
    body = mail.message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    page_html = mail.message.get_body(("html",)).get_content()

    # Every figure, against the event rows of the week and of the week before.
    now = _expected(_events(store, period.since, period.until))
    before = _expected(_events(store, period.previous_since, period.since))
    assert now["received"] != "0" and before["received"] != "0"
    assert now["bounced"] != "0" and now["opened"] != "0"
    for name in ("received", "delivered", "bounced", "opened", "clicked"):
        found = re.search(rf"^{name}\s+([\d,]+)\s+([\d,]+)$", body, re.M)
        assert found, (name, body)
        assert [found.group(1), found.group(2)] == [now[name], before[name]], name
    for name in ("delivery rate", "bounce rate", "open rate", "click rate"):
        found = re.search(rf"^{name}\s+(\S+ %|—)\s+(\S+ %|—)", body, re.M)
        assert found, (name, body)
        assert [found.group(1), found.group(2)] == [now[name], before[name]], name
    with store.read() as conn:
        n = func.count().label("n")
        domains = conn.execute(
            select(deliveries.c.recipient_domain, n)
            .where(
                deliveries.c.status == "bounced",
                deliveries.c.last_attempt_at >= period.since,
                deliveries.c.last_attempt_at < period.until,
            )
            .group_by(deliveries.c.recipient_domain)
            .order_by(n.desc(), deliveries.c.recipient_domain)
        ).all()
        reasons: dict[str, int] = {}
        for data in conn.execute(
            select(events.c.data).where(
                events.c.type == "delivery.bounced",
                events.c.created_at >= period.since,
                events.c.created_at < period.until,
            )
        ).scalars():
            category = (data or {}).get("category") or "unknown"
            reasons[category] = reasons.get(category, 0) + 1
    assert domains
    for domain, count in domains[:1]:
        assert f"  {domain}: {count:,}" in body
    top_reason, top_count = max(reasons.items(), key=lambda kv: kv[1])
    assert f"  {top_reason}: {top_count:,}" in body
    local_alert = f"{(period.until - timedelta(minutes=1)).astimezone(zone):%Y-%m-%d} 23:59"
    assert f"  {local_alert}  shop: bounce_rate" in body
    assert "Times are Pacific/Auckland." in body

    # The HTML part: no scripts, nothing fetched, the same figures, and it fits a phone.
    assert "<script" not in page_html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page_html, re.I)
    page, watch = open_page(postbode.base, viewport={"width": 390, "height": 844})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_content(page_html)
    for name in ("received", "delivered", "bounced", "opened", "clicked"):
        row = page.locator(f"#volume tr[data-figure='{name}'] td")
        expect(row.nth(0)).to_have_text(now[name])
        expect(row.nth(1)).to_have_text(before[name])
        expect(row.nth(0)).to_be_visible()
    for name in ("delivery rate", "bounce rate", "open rate", "click rate"):
        row = page.locator(f"#rates tr[data-figure='{name}'] td")
        expect(row.nth(0)).to_have_text(now[name])
        expect(row.nth(1)).to_have_text(before[name])
    expect(page.locator("#bounce-domains")).to_contain_text(domains[0][0])
    expect(page.locator("#bounce-reasons")).to_contain_text(top_reason.replace("_", " "))
    expect(page.locator("#alerts")).to_contain_text(local_alert)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    assert requests == [] and watch.errors == []

    # The same report as CSV through the API, in local times.
    api = page.request.get(
        f"{postbode.base}/api/v1/stats/export?format=csv&period=weekly",
        headers={"Authorization": f"Bearer {postbode.shop.api_key}"},
    )
    assert api.status == 200 and api.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(api.text())))
    assert rows[0] == ["section", "name", "value", "previous"]
    assert rows[2] == ["period", "until", period.until.astimezone(zone).isoformat(), ""]
    assert rows[3] == ["period", "time_zone", "Pacific/Auckland", ""]
    assert rows[4] == [
        "volume",
        "received",
        now["received"].replace(",", ""),
        before["received"].replace(",", ""),
    ]
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
    expect(page.locator(".page-head .muted")).to_contain_text("times in UTC")  # the default
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
