"""Hostile mail renders inert everywhere in the UI: a message whose subject, sender, tag,
metadata, remote replies and HTML carry script payloads runs none of them in Chromium."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from postbode.store.schema import deliveries, messages
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

# Chromium is launched once per module; keep the modules on one worker.
pytestmark = pytest.mark.xdist_group("browser")

# Each payload would set window.__pwned, change the title or open a dialog if it ran.
SCRIPT = "<script>window.__pwned='script';document.title='pwned'</script>"
IMG = "<img src=x onerror=\"window.__pwned='img';document.title='pwned';alert('xss')\">"
SVG = "<svg onload=\"window.__pwned='svg';alert('svg')\"></svg>"
PAYLOAD = SCRIPT + IMG + SVG
TAG = "<img src=x onerror=alert(1)>"  # short: a folded control header keeps its line break
HTML = (
    "<html><body><h1>Hello</h1>"
    + PAYLOAD
    + "<a id=js href=\"javascript:parent.__pwned='link'\">click</a>"
    "<iframe src=\"javascript:parent.__pwned='frame'\"></iframe>"
    "<form action=\"javascript:parent.__pwned='form'\"><button id=go>go</button></form>"
    "<meta http-equiv=refresh content=\"0;url=javascript:parent.__pwned='meta'\">"
    '<img src="https://tracker.example/p.gif"></body></html>'
)


def test_payloads_stay_text_everywhere(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(Rule.rcpt("victim@dest.test", "451 4.7.1 " + IMG))
    postbode.send(
        ["victim@dest.test"],
        "Invoice " + PAYLOAD,
        html=HTML,
        sender='"<svg onload=window.__pwned=1>" <orders@shop.test>',
        headers={
            "X-Postbode-Tag": TAG,
            "X-Postbode-Metadata-customer": SCRIPT,
            "X-Custom": PAYLOAD,
        },
    )

    def deferred() -> bool:
        with postbode.store.read() as conn:
            return conn.execute(select(deliveries.c.status)).scalar() == "deferred"

    wait_for(deferred)
    with postbode.store.read() as conn:
        message_id, tag = conn.execute(select(messages.c.id, messages.c.tag)).one()
    assert tag == TAG

    page, watch = open_page(postbode.base, "admin@org.test")
    visits = {
        "/messages": "Invoice <script>",
        f"/messages/{message_id}": "451 4.7.1 <img src=x",
        f"/messages/{message_id}?remote=1": "Remote images are shown.",
        "/queue?app=shop&view=deferred": "451 4.7.1 <img src=x",
        "/dashboard?range=1h": TAG,
        f"/messages?{urlencode({'tag': tag})}": "Invoice <script>",
        "/audit": "Audit log",
    }
    for path, shown in visits.items():
        page.goto(postbode.base + path)
        # The payload is on the page, as text.
        expect(page.locator("main")).to_contain_text(shown)
        assert page.evaluate("window.__pwned") is None, path
        assert page.title() != "pwned" and page.title().endswith(" · Postbode"), path

    # In the message's own page the HTML part is in a sandboxed frame with no scripts: the
    # payloads reached it (the frame shows the heading), and Chromium refused to run them.
    page.goto(f"{postbode.base}/messages/{message_id}")
    frame = page.frame_locator("iframe.preview")
    expect(frame.locator("h1")).to_have_text("Hello")
    frame.locator("#js").click()
    frame.locator("#go").click()
    assert page.evaluate("window.__pwned") is None
    blocked = [t for kind, t, url in watch.console if "/preview" in url or "/preview" in t]
    assert any("sandboxed" in t and "allow-scripts" in t for t in blocked), watch.console
    # Remote images stay blocked until asked for.
    assert any("tracker.example" in t and "img-src data:" in t for t in blocked)
    assert watch.dialogs == [] and watch.errors == []
    assert watch.csp_violations() == []
