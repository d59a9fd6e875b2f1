"""In headless Chromium against the real pipeline: the dashboard's sending health (each app's rate
against its baseline, bounce and complaint rates against their thresholds, with a cue) and its
per-template figures, at 1440 and at 390 pixels wide; a credential's own limits set from the
app page; a scheduled message cancelled whole from its page; the template preview page."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import delete, func, insert, select

from postbode import tenancy
from postbode.abuse import figures, limits
from postbode.store.schema import deliveries, stat_counters, system_values
from postbode.templates import manage
from postbode.testing.sink import Rule
from postbode.web.ui import dashboard

from .conftest import Postbode, Watch, wait_for

# Chromium is launched once per module; keep the modules on one worker.
pytestmark = pytest.mark.xdist_group("browser")

WELCOME_HTML = "<h1>Hello {{ name }}</h1>\n<p>{{ note }}</p>\n<p>Order {{ order.id }}</p>"


def api(pb: Postbode, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(
        f"{pb.base}{path}", json=body, headers={"Authorization": f"Bearer {pb.shop.api_key}"}
    )
    assert answer.status_code in (200, 202), answer.text
    result: dict[str, Any] = answer.json()
    return result


def statuses(pb: Postbode) -> list[str]:
    with pb.store.read() as conn:
        return sorted(conn.execute(select(deliveries.c.status)).scalars())


def no_sideways_scroll(page: Page, width: int) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width


def clean(watch: Watch) -> None:
    assert watch.dialogs == [] and watch.errors == [] and watch.csp_violations() == []


def test_the_dashboard_shows_health_and_template_figures_at_both_widths(
    postbode: Postbode,
    open_page: Callable[..., tuple[Page, Watch]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pb = postbode
    monkeypatch.setattr(dashboard, "REFRESH_SECONDS", 1)
    with pb.store.write() as conn:  # an earlier test's release of an app with the same id
        conn.execute(delete(system_values).where(system_values.c.name.like("abuse.%")))
    manage.create_template(
        pb.store, pb.shop.app_id, "welcome", subject="Welcome {{ name }}", html=WELCOME_HTML
    )
    pb.sink.script.add(Rule.rcpt("gone@dest.test", "550 5.1.1 No such user here"))
    for to in ("ann@dest.test", "bob@dest.test", "gone@dest.test"):
        model = {"name": to, "note": "hi", "order": {"id": 1}}
        api(
            pb,
            "/api/v1/messages",
            {"from": "orders@shop.test", "to": [to], "template": "welcome", "model": model},
        )
    api(
        pb,
        "/api/v1/messages",
        {"from": "orders@shop.test", "to": ["cy@dest.test"], "subject": "Plain", "text": "x"},
    )
    wait_for(lambda: statuses(pb) == ["bounced", "delivered", "delivered", "delivered"])
    # A second app whose rate over the last minute is far above its baseline for this hour of
    # the week (2/min a week ago, 150 in this minute): a spike.
    news = tenancy.create_app(pb.store, "newsletter")
    now = datetime.now(UTC)
    # The rate is a sliding minute over per-minute counters: the dashboard reads it at the
    # moment seeded here, so a minute that ends while the test runs changes no figure.
    monkeypatch.setattr(figures, "utcnow", lambda: now)
    with pb.store.write() as conn:
        conn.execute(
            insert(stat_counters),
            [
                {
                    "app_id": news.app_id,
                    "stream": "transactional",
                    "tag": "",
                    "bucket": at,
                    "event_type": "message.received",
                    "count": n,
                    "bot_count": 0,
                }
                for at, n in (
                    (now.replace(minute=0, second=0, microsecond=0) - timedelta(weeks=1), 120),
                    (now.replace(second=0, microsecond=0), 150),
                )
            ],
        )

    page, watch = open_page(pb.base, "viewer@org.test", viewport={"width": 1440, "height": 900})
    page.goto(f"{pb.base}/dashboard?range=24h")
    health = page.locator("#sending-health")
    spike = health.locator('[data-app="newsletter"] [data-figure="rate"]')
    expect(spike).to_have_attribute("data-cue", "over")
    expect(spike.locator(".badge")).to_have_text("over")
    expect(spike).to_contain_text("150.0/min")
    expect(spike).to_contain_text("baseline 2.0/min")
    expect(spike).to_contain_text("spike above 100/min")
    # shop: 1 hard bounce of 4 (25 %, above 10 %) on fewer deliveries than the guard needs.
    bounce = health.locator('[data-app="shop"] [data-figure="bounce"]')
    expect(bounce).to_have_attribute("data-cue", "near")
    expect(bounce).to_contain_text("25.0 %")
    expect(bounce).to_contain_text("1 hard of 4")
    expect(health.locator('[data-app="shop"] [data-figure="complaint"]')).to_contain_text(
        "0 of 3 delivered"
    )
    row = page.locator('#template-stats tr[data-template="welcome"]')
    expect(row.locator('[data-stat="sent"]')).to_have_text("3")
    expect(row.locator('[data-stat="delivered"]')).to_contain_text("2")
    expect(row.locator('[data-stat="bounced"]')).to_contain_text("1")
    expect(row).to_contain_text("shop")  # the organisation's view names the app
    expect(page.locator("#template-stats tbody tr")).to_have_count(1)  # not the plain one
    no_sideways_scroll(page, 1440)
    # The live refresh brings the health anew; the template figures, shown with the page, stay.
    with page.expect_response(lambda r: "/dashboard/live" in r.url):
        pass
    expect(spike).to_contain_text("150.0/min")
    expect(row.locator('[data-stat="sent"]')).to_have_text("3")
    page.screenshot(path=str(tmp_path / "dashboard-1440.png"), full_page=True)

    # The app filter and the range filter the template figures.
    page.goto(f"{pb.base}/dashboard?app=newsletter&range=24h")
    expect(page.locator("#template-stats")).to_contain_text("No mail made from a template")
    expect(page.locator('#sending-health [data-app="shop"]')).to_have_count(0)
    page.locator(".segmented a", has_text="1h").click()
    expect(page.locator(".span-label")).to_have_text("last 1h")
    page.goto(f"{pb.base}/dashboard?app=shop&range=1h")
    expect(page.locator('#template-stats tr[data-template="welcome"]')).to_be_visible()
    # Over more than a day too, with the page (read from the counters).
    page.goto(f"{pb.base}/dashboard?app=shop&range=7d")
    expect(page.get_by_role("button", name="Count them")).to_have_count(0)
    expect(
        page.locator('#template-stats tr[data-template="welcome"] [data-stat="sent"]')
    ).to_have_text("3")
    clean(watch)

    phone, phone_watch = open_page(
        pb.base, "viewer@org.test", viewport={"width": 390, "height": 844}
    )
    phone.goto(f"{pb.base}/dashboard?range=24h")
    cue = phone.locator('#sending-health [data-app="newsletter"] [data-figure="rate"] .badge')
    expect(cue).to_be_visible()
    box = cue.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390
    expect(phone.locator('#template-stats tr[data-template="welcome"]')).to_be_attached()
    no_sideways_scroll(phone, 390)
    phone.screenshot(path=str(tmp_path / "dashboard-390.png"), full_page=True)
    clean(phone_watch)


def test_a_credentials_limits_from_the_app_page(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    pb = postbode
    (key,) = [c for c in tenancy.list_credentials(pb.store, "shop") if c["kind"] == "api"]
    page, watch = open_page(pb.base, "admin@org.test", viewport={"width": 390, "height": 844})
    page.goto(f"{pb.base}/settings/apps/shop")
    form = page.locator(f'form[data-credential="{key["id"]}"]')
    form.locator("input[name=per_minute]").fill("30")
    form.locator("input[name=per_day]").fill("1000")
    no_sideways_scroll(page, 390)
    form.get_by_role("button", name="Save").click()
    expect(page.locator(".flash")).to_contain_text(f"credential {key['id']} saved")
    with pb.store.read() as conn:
        assert limits.get_limits(conn, pb.shop.app_id, key["id"]) == limits.Limits(30, None, 1000)
        assert limits.get_limits(conn, pb.shop.app_id) == limits.Limits()
    expect(form.locator("input[name=per_minute]")).to_have_value("30")
    # The audit log shows it, as for the app's own limits.
    page.goto(f"{pb.base}/audit")
    expect(page.locator("body")).to_contain_text(f"shop credential {key['id']}")
    clean(watch)


def test_a_scheduled_message_is_cancelled_from_its_page(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    pb = postbode
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    sent = api(
        pb,
        "/api/v1/messages",
        {
            "from": "orders@shop.test",
            "to": ["ann@dest.test", "bob@dest.test"],
            "subject": "Your appointment tomorrow",
            "text": "See you.",
            "send_at": later,
        },
    )
    page, watch = open_page(pb.base, "admin@org.test")
    page.goto(f"{pb.base}/messages/{sent['id']}")
    cancel = page.locator(".head-actions").get_by_role("button", name="Cancel message")
    cancel.click()  # the confirmation is dismissed: nothing changes
    assert len(watch.dialogs) == 1 and "2 deliveries not sent yet" in watch.dialogs[0]
    assert statuses(pb) == ["scheduled", "scheduled"]
    page.evaluate("window.confirm = () => true")
    cancel.click()
    expect(page.locator(".flash")).to_contain_text("Message cancelled: 2 deliveries")
    assert statuses(pb) == ["cancelled", "cancelled"]
    expect(page.locator("#recipients .status-cancelled")).to_have_count(2)
    expect(
        page.locator(".head-actions").get_by_role("button", name="Cancel message")
    ).to_have_count(0)
    with pb.store.read() as conn:
        events = conn.execute(
            select(func.count()).select_from(deliveries).where(deliveries.c.status == "cancelled")
        ).scalar_one()
    assert events == 2
    assert watch.errors == [] and watch.csp_violations() == []


def test_the_template_preview_page(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    pb = postbode
    manage.create_template(
        pb.store,
        pb.shop.app_id,
        "welcome",
        subject="Welcome {{ name }}",
        # The template's own script: the frame is sandboxed without scripts, so it never runs.
        html=WELCOME_HTML + "\n<script>document.title = 'ran'; window.top.__ran = 1</script>",
        text="Hi {{ name }},\n{{ note }}",
    )
    hostile = "<script>window.top.__pwned = 1; document.title = 'pwned'</script>Ann"
    model = {"name": hostile, "note": "<img src=x onerror=alert(1)>", "order": {"id": 42}}
    page, watch = open_page(pb.base, "viewer@org.test")
    page.goto(f"{pb.base}/templates/welcome?app=shop")
    page.locator("#preview-form textarea[name=model]").fill(json.dumps(model))
    page.locator("#preview-form").get_by_role("button", name="Preview").click()

    expect(page.locator("#rendered-subject")).to_have_text(f"Welcome {hostile}")
    expect(page.locator("#rendered-text")).to_contain_text(f"Hi {hostile},")
    frame_el = page.locator("iframe.preview")
    # Sandboxed with nothing allowed: no scripts, no same origin, no forms, no pop-ups.
    assert frame_el.get_attribute("sandbox") == ""
    frame = page.frame_locator("iframe.preview")
    expect(frame.locator("h1")).to_have_text(f"Hello {hostile}")  # shown as text
    expect(frame.locator("p").first).to_have_text(model["note"])
    expect(frame.locator("p").nth(1)).to_have_text("Order 42")
    expect(frame.locator("script")).to_have_count(1)  # the template's own, not the model's
    expect(frame.locator("img")).to_have_count(0)
    inner = next(f for f in page.frames if f.url.endswith("/preview") or "/preview?" in f.url)
    assert inner.title() != "ran"
    assert page.evaluate("[window.__pwned, window.__ran]") == [None, None]
    assert page.title() != "pwned" and watch.dialogs == [] and watch.errors == []

    # A model the template cannot render: the error names the part and the line.
    page.locator("#preview-form textarea[name=model]").fill(json.dumps({"name": "Ann"}))
    page.locator("#preview-form").get_by_role("button", name="Preview").click()
    expect(page.locator("#errors")).to_contain_text("html, line 3")
    expect(page.locator("#rendered")).to_have_count(0)

    # A syntax error in a new version is refused, naming its line; the live one stays.
    editor, _ = open_page(pb.base, "admin@org.test")
    editor.goto(f"{pb.base}/templates/welcome?app=shop")
    editor.locator("#edit-template textarea[name=html]").fill("<p>Hi</p>\n<p>{{ name.upper( }}</p>")
    editor.locator("#edit-template").get_by_role("button", name="Save version").click()
    expect(editor.locator(".flash")).to_contain_text("line 2")
    assert manage.get_template(pb.store, pb.shop.app_id, "welcome")["latest_version"] == 1
    assert watch.csp_violations() == []
