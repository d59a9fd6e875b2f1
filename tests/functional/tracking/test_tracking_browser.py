"""Opens and clicks from a real headless Chromium loading the delivered HTML: tracked mail goes
through the whole pipeline, is DKIM-signed after the rewrite, and the browser's hits become
events; forged links get a 404 and a scanner's click is a bot."""

from __future__ import annotations

import email
import smtplib
from collections.abc import Callable
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from typing import Any

import dkim
from playwright.sync_api import sync_playwright
from sqlalchemy import select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, utcnow
from postbode.testing.servers import PostbodeInProcess
from postbode.testing.sink import SmtpSink
from postbode.web.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
SCANNER = "Mozilla/5.0 (compatible; Proofpoint URL Defense)"


def tracked_events(store: Store, kind: str) -> list[Any]:
    with store.read() as conn:
        query = select(events).where(events.c.type == kind).order_by(events.c.id)  # time order
        return list(conn.execute(query).mappings())


def test_chromium_opens_and_clicks(
    settings: Settings, store: Store, http: Any, eventually: Callable[..., None]
) -> None:
    shop = tenancy.create_app(store, "shop")
    domain = tenancy.add_domain(store, "shop", "shop.test")
    with SmtpSink() as sink:
        settings = settings.model_copy(
            update={
                "tracking_url": http.base,
                "transport_map": f"dest.test={sink.host}:{sink.port}",
            }
        )
        http.start(create_app(settings, store))
        with PostbodeInProcess(settings, store) as postbode:
            msg = EmailMessage()
            msg["From"] = "Shop <orders@shop.test>"
            msg["To"] = "alice@dest.test"
            msg["Subject"] = "Your order"
            msg["X-Postbode-Track-Opens"] = "yes"
            msg["X-Postbode-Track-Clicks"] = "yes"
            msg.set_content("Your order: see the HTML part.")
            msg.add_alternative(
                "<html><body><h1>Bedankt voor je bestelling \u2014 caf\u00e9</h1>"
                f'<p><a id="order" href="{http.base}/healthz?from=mail&amp;n=1">Order 42</a></p>'
                f'<p><a id="help" href="{http.base}/healthz?from=help">Help</a></p>'
                '<p><a id="unsub" href="https://shop.test/unsubscribe">Unsubscribe</a></p>'
                "</body></html>",
                subtype="html",
            )
            with smtplib.SMTP(postbode.host, postbode.port) as client:
                client.login(shop.smtp_username, shop.smtp_password)
                client.send_message(msg)
            (received,) = sink.wait_for_sync(1, timeout=20)
            eventually(lambda: bool(tracked_events(store, "delivery.delivered")))

    # The rewrite happened before DKIM signing: the signature covers the tracked HTML.
    public = domain["dkim_public_key"].encode()
    assert dkim.verify(received.data, dnsfunc=lambda name, timeout=5: public)
    parsed = email.message_from_bytes(received.data, policy=policy.default)
    html = next(p for p in parsed.walk() if p.get_content_type() == "text/html").get_content()
    assert f"{http.base}/t/o/" in html and html.count(f"{http.base}/t/c/") == 2
    assert 'href="https://shop.test/unsubscribe"' in html  # unsubscribe links are left alone
    plain = next(p for p in parsed.walk() if p.get_content_type() == "text/plain")
    assert plain.get_content().rstrip() == "Your order: see the HTML part."

    # The person reads the mail a while after delivery (sooner would count as a scanner).
    with store.write() as conn:
        conn.execute(update(deliveries).values(last_attempt_at=utcnow() - timedelta(minutes=5)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            person = browser.new_context(user_agent=DESKTOP)
            page = person.new_page()
            with page.expect_response(lambda r: "/t/o/" in r.url) as pixel:
                page.set_content(html)
            assert pixel.value.status == 200
            assert pixel.value.headers["content-type"] == "image/gif"
            page.click("#order")
            page.wait_for_url(f"{http.base}/healthz?from=mail&n=1")
            assert '"status":"ok"' in page.content().replace(" ", "")

            # A forged click link: 404, and the browser stays where it is.
            page.set_content(html)
            help_url = page.get_attribute("#help", "href")
            assert help_url is not None
            forged = help_url[:-4] + ("AAAA" if not help_url.endswith("AAAA") else "BBBB")
            response = page.goto(forged)
            assert response is not None and response.status == 404
            assert page.url == forged

            scanner = browser.new_context(user_agent=SCANNER).new_page()
            scanner.goto(help_url)
            scanner.wait_for_url(f"{http.base}/healthz?from=help")
        finally:
            browser.close()

    eventually(lambda: len(tracked_events(store, "message.clicked")) == 2)
    eventually(lambda: len(tracked_events(store, "message.opened")) >= 1)
    opens = tracked_events(store, "message.opened")
    first = opens[0]["data"]
    assert first["first"] is True and first["bot"] is False
    assert first["user_agent"] == "Chrome" and first["ip"] == "127.0.0.0"
    clicks = sorted(tracked_events(store, "message.clicked"), key=lambda e: e["id"])
    person_click, scanner_click = (c["data"] for c in clicks)
    assert person_click["url"] == f"{http.base}/healthz?from=mail&n=1"
    assert (person_click["bot"], person_click["bot_reason"]) == (False, None)
    assert person_click["ip"] == "127.0.0.0" and person_click["link"] == 0
    assert scanner_click["url"] == f"{http.base}/healthz?from=help"
    assert (scanner_click["bot"], scanner_click["bot_reason"]) == (True, "proofpoint")
    assert all(c["recipient"] == "alice@dest.test" for c in clicks)
