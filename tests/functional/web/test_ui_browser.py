"""The web UI in headless Chromium against the real pipeline: sign in, follow a message from
SMTP to the sink into the log and its transcript, retry a deferred delivery, manage
suppressions and API keys, roles and CSRF, and live refresh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from postbode import tenancy
from postbode.store.schema import deliveries, domains, messages
from postbode.testing.sink import Rule
from postbode.web.ui import dashboard

from .conftest import Postbode, Watch, wait_for

# Chromium is launched once per module; keep the modules on one worker.
pytestmark = pytest.mark.xdist_group("browser")


def status_of(pb: Postbode, recipient: str) -> str | None:
    with pb.store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()


def message_id(pb: Postbode, subject: str) -> Any:
    with pb.store.read() as conn:
        return conn.execute(select(messages.c.id).where(messages.c.subject == subject)).scalar()


def clean(watch: Watch) -> None:
    assert watch.dialogs == [] and watch.errors == []
    assert watch.csp_violations() == []


def test_a_sent_message_in_the_log_with_its_transcript(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.send(["alice@dest.test"], "Order 1001 confirmed", headers={"X-Postbode-Tag": "order"})
    postbode.sink.wait_for_sync(1, timeout=20)
    wait_for(lambda: status_of(postbode, "alice@dest.test") == "delivered")

    page, watch = open_page(postbode.base, "owner@org.test")
    page.get_by_role("link", name="Messages", exact=True).click()
    row = page.locator("tr", has_text="Order 1001 confirmed")
    expect(row).to_contain_text("alice@dest.test")
    expect(row.locator(".badge")).to_have_text("delivered")
    row.get_by_role("link", name="Order 1001 confirmed").click()

    expect(page.locator("h1")).to_have_text("Order 1001 confirmed")
    transcript = page.locator("pre.transcript").first
    expect(transcript).to_contain_text("EHLO mta.postbode.test")
    expect(transcript).to_contain_text("RCPT TO:<alice@dest.test>")
    expect(transcript).to_contain_text("250")
    attempt = page.locator("article.attempt").first
    expect(attempt).to_contain_text("Delivered")
    expect(attempt).to_contain_text(postbode.sink.host)
    timeline = page.locator("ol.timeline")
    for event in ("message.received", "delivery.queued", "delivery.delivered"):
        expect(timeline).to_contain_text(event)
    expect(page.locator("pre.text-part")).to_contain_text("Your order is on its way.")
    clean(watch)


def test_retry_a_deferred_delivery_from_the_queue(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(
        Rule.rcpt("grey@dest.test", "451 4.7.1 Greylisted, try again in 10 minutes", "250 2.1.5 OK")
    )
    postbode.send(["grey@dest.test"], "Your invoice")
    wait_for(lambda: status_of(postbode, "grey@dest.test") == "deferred")

    page, watch = open_page(postbode.base, "admin@org.test")
    page.goto(f"{postbode.base}/queue?app=shop&view=deferred")
    expect(page.locator(".card", has_text="Deferred by destination")).to_contain_text("dest.test")
    row = page.locator("tr", has_text="grey@dest.test")
    expect(row).to_contain_text("451 4.7.1 Greylisted")
    expect(row.locator(".badge")).to_have_text("deferred")
    row.locator("input[name=ids]").check()
    page.get_by_role("button", name="Retry selected").click()

    expect(page.locator("h1")).to_have_text("Retry 1 delivery?")
    page.get_by_role("button", name="Yes, retry 1").click()
    expect(page.locator(".flash")).to_have_text("1 delivery retried.")
    postbode.sink.wait_for_sync(1, timeout=20)
    wait_for(lambda: status_of(postbode, "grey@dest.test") == "delivered")
    page.goto(f"{postbode.base}/messages/{message_id(postbode, 'Your invoice')}")
    recipient = page.locator("#recipients tr", has_text="grey@dest.test")
    expect(recipient.locator(".badge")).to_have_text("delivered")
    expect(page.locator("ol.timeline")).to_contain_text("delivery.deferred")
    clean(watch)


def test_add_and_remove_a_suppression(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base, "admin@org.test")
    page.get_by_role("link", name="Suppressions").click()
    expect(page.locator(".empty")).to_have_text("The suppression list is empty.")
    form = page.locator("#add-suppression")
    form.locator("input[name=email]").fill("complainer@dest.test")
    form.locator("select[name=stream]").select_option("broadcast")
    form.get_by_role("button", name="Suppress").click()
    expect(page.locator(".flash")).to_have_text(
        "complainer@dest.test added to the suppression list (broadcast)."
    )
    row = page.locator("tr", has_text="complainer@dest.test")
    expect(row).to_contain_text("broadcast")
    row.get_by_role("button", name="Remove").click()
    expect(page.locator(".flash")).to_have_text(
        "complainer@dest.test removed from the suppression list."
    )
    expect(page.locator("tr", has_text="complainer@dest.test")).to_have_count(0)
    clean(watch)


def test_create_an_api_key_and_use_it(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    page, watch = open_page(postbode.base, "admin@org.test")
    page.get_by_role("link", name="Apps & settings").click()
    page.get_by_role("link", name="shop").click()
    form = page.locator("#new-credential")
    form.locator("select[name=kind]").select_option("api")
    form.locator("input[name=name]").fill("ci pipeline")
    form.get_by_role("button", name="Create").click()
    expect(page.locator(".flash-warn")).to_contain_text("cannot show it again")
    key = page.locator("code.secret").inner_text().strip()
    assert key.startswith("pb_") and tenancy.authenticate_api_key(postbode.store, key)
    answer = page.request.get(
        f"{postbode.base}/api/v1/messages", headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status == 200 and answer.json()["data"] == []
    page.get_by_role("link", name="Done").click()
    expect(page.locator("#credentials")).to_contain_text("ci pipeline")
    assert key not in page.content()
    clean(watch)


def test_a_viewer_sees_no_admin_actions_and_a_post_without_token_is_refused(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(Rule.rcpt("later@dest.test", "451 4.3.0 Try again later"))
    postbode.send(["later@dest.test"], "Weekly digest")
    wait_for(lambda: status_of(postbode, "later@dest.test") == "deferred")
    page, watch = open_page(postbode.base, "viewer@org.test")
    page.goto(f"{postbode.base}/messages/{message_id(postbode, 'Weekly digest')}")
    expect(page.locator("#recipients tr", has_text="later@dest.test")).to_contain_text("451 4.3.0")
    expect(page.get_by_role("button", name="Retry now")).to_have_count(0)
    expect(page.get_by_role("button", name="Suppress")).to_have_count(0)
    page.goto(f"{postbode.base}/queue?app=shop")
    expect(page.locator("tr", has_text="later@dest.test")).to_be_visible()
    expect(page.get_by_role("button", name="Retry selected")).to_have_count(0)
    expect(page.locator("input[name=ids]")).to_have_count(0)
    expect(page.get_by_role("link", name="Users")).to_have_count(0)

    # A form posted without its token (as another site would): refused, nothing changed.
    refused = page.request.post(
        f"{postbode.base}/suppressions?app=shop", form={"email": "x@dest.test"}
    )
    assert refused.status == 403 and "security token" in refused.text()
    admin, _ = open_page(postbode.base, "admin@org.test")
    tokenless = admin.request.post(
        f"{postbode.base}/queue/apply?app=shop",
        form={"action": "cancel", "scope": "filter", "view": "deferred"},
    )
    assert tokenless.status == 403
    assert status_of(postbode, "later@dest.test") == "deferred"
    clean(watch)


def test_the_dashboard_refreshes_itself(
    postbode: Postbode,
    open_page: Callable[..., tuple[Page, Watch]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "REFRESH_SECONDS", 1)
    page, watch = open_page(postbode.base, "owner@org.test")
    page.goto(f"{postbode.base}/dashboard?range=1h")
    expect(page.locator("body")).to_have_attribute("data-chart", "drawn")
    expect(page.locator("[data-kpi=received]")).to_have_text("0")
    postbode.send(["live@dest.test"], "Welcome aboard")
    postbode.sink.wait_for_sync(1, timeout=20)
    # No reload: the htmx poll brings the new numbers, and the chart keeps its canvas.
    with page.expect_response(lambda r: "/dashboard/live" in r.url):
        pass
    expect(page.locator("[data-kpi=received]")).to_have_text("1")
    expect(page.locator("[data-kpi=delivery_rate]")).to_have_text("100.0\u202f%")
    assert page.evaluate("document.querySelectorAll('canvas').length") == 1
    drawn = "Chart.getChart(document.querySelector('#chart-card canvas')).data.datasets[0].data"
    assert page.evaluate(f"{drawn}.reduce((a, b) => a + b)") == 1
    clean(watch)


def test_check_a_domains_dns_in_place(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    settings = postbode.settings
    with postbode.store.read() as conn:
        domain = dict(conn.execute(select(domains)).mappings().one())
    for record in tenancy.dns_records(domain, settings.smtp_hostname, settings.return_path_domain):
        if record["purpose"] == "dkim":
            postbode.dns.add_txt(record["name"], record["value"])
        elif record["purpose"] == "return_path":
            postbode.dns.add_cname(record["name"], record["value"])
    postbode.dns.add_txt("shop.test", "v=spf1 mx -all")
    page, watch = open_page(postbode.base, "admin@org.test")
    page.goto(f"{postbode.base}/settings/apps/shop/domains?app=shop")
    card = page.locator(f"#domain-{domain['id']}")
    expect(card).to_contain_text("not verified")
    url = page.url
    with page.expect_response(lambda r: "/check" in r.url and r.status == 200):
        card.get_by_role("button", name="Check DNS now").click()
    # htmx posted the form (with the CSRF header) and swapped just this card: no navigation.
    card = page.locator(f"#domain-{domain['id']}")
    expect(card).to_contain_text("checked just now")
    expect(card.locator(".badge", has_text="verified")).to_have_text("verified")
    expect(card.locator("tr", has_text="spf")).to_contain_text("v=spf1 mx -all")
    expect(card.locator("tr", has_text="dmarc").locator(".badge")).to_have_text("missing")
    assert page.url == url

    # The return-path domain's MX (bounces arrive there): a failing lookup is not "missing".
    mx_row = card.locator("tr", has_text="return path mx")
    expect(mx_row).to_contain_text(settings.return_path_domain)
    expect(mx_row.locator(".dns-value code")).to_have_text(f"10 {settings.smtp_hostname}.")
    postbode.dns.servfail(settings.return_path_domain, "MX")
    with page.expect_response(lambda r: "/check" in r.url and r.status == 200):
        card.get_by_role("button", name="Check DNS now").click()
    mx_row = page.locator(f"#domain-{domain['id']} tr", has_text="return path mx")
    expect(mx_row.locator(".badge")).to_have_text("lookup failed")
    expect(mx_row).to_contain_text("last known: missing")  # never answered so far
    expect(mx_row).to_contain_text("SERVFAIL")
    postbode.dns.heal(settings.return_path_domain, "MX")
    postbode.dns.add_mx(settings.return_path_domain, [(10, settings.smtp_hostname)])
    with page.expect_response(lambda r: "/check" in r.url and r.status == 200):
        page.locator(f"#domain-{domain['id']}").get_by_role("button", name="Check DNS now").click()
    mx_row = page.locator(f"#domain-{domain['id']} tr", has_text="return path mx")
    expect(mx_row.locator(".badge")).to_have_text("pass")
    expect(mx_row).to_contain_text(f"names {settings.smtp_hostname}")
    clean(watch)


def test_reading_works_without_javascript(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.send(["plain@dest.test"], "No scripts needed", headers={"X-Postbode-Tag": "plain"})
    wait_for(lambda: status_of(postbode, "plain@dest.test") == "delivered")
    page, watch = open_page(postbode.base, "viewer@org.test", java_script_enabled=False)
    page.goto(f"{postbode.base}/dashboard?range=1h")
    expect(page.locator("[data-kpi=received]")).to_have_text("1")
    page.locator("details.series-table summary").click()
    expect(page.locator("details.series-table table")).to_be_visible()
    page.goto(f"{postbode.base}/messages?tag=plain")
    page.get_by_role("link", name="No scripts needed").click()
    expect(page.locator("#recipients")).to_contain_text("delivered")
    page.locator("details", has_text="SMTP transcript").last.locator("summary").click()
    expect(page.locator("pre.transcript").last).to_contain_text("RCPT TO:<plain@dest.test>")
    # The app switcher falls back to a button.
    page.goto(f"{postbode.base}/queue")
    page.locator("#app-switch").select_option("shop")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(f"{postbode.base}/queue?app=shop")
    clean(watch)
