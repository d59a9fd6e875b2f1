"""Screenshots of the dashboard, a message and the queue (1280 by 800) with realistic data, for
docs/screenshots: today's mail goes through the real pipeline; the day before it is recorded
through the same event recorder the pipeline uses, backdated."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from postbode import tenancy
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.schema import deliveries, messages, utcnow
from postbode.templates import manage
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

# Chromium is launched once per module; keep the modules on one worker.
pytestmark = pytest.mark.xdist_group("browser")

DOCS = Path(__file__).resolve().parents[3] / "docs" / "screenshots"
# Taken on every run; written over the committed ones only when asked, so a test run leaves
# the working tree as it was: POSTBODE_UPDATE_SCREENSHOTS=1 pytest tests/functional/web
UPDATE = os.environ.get("POSTBODE_UPDATE_SCREENSHOTS") == "1"
TAGS = ("order-confirmation", "password-reset", "shipping-update", "welcome", "invoice")
# Replies real providers give, for the deferred and bounced deliveries.
REPLIES = {
    "gmail.test": "421 4.7.28 Our system has detected an unusual rate of unsolicited mail "
    "originating from your IP address. To protect our users from spam, mail sent from your IP "
    "address has been temporarily rate limited.",
    "outlook.test": "451 4.7.650 The mail server has been temporarily rate limited due to IP "
    "reputation.",
    "yahoo.test": "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to "
    "unexpected volume or user complaints",
    "full.test": "452 4.2.2 The email account that you tried to reach is over quota.",
}
ORDER_HTML = (Path(__file__).parent / "order.html").read_text()  # an order confirmation


def backdated_history(pb: Postbode, app_id: int, hours: int = 24, seed: int = 7) -> None:
    """A day of traffic through events.record (counters and events alike): a daily rhythm,
    some deferrals, a few bounces, opens and clicks by people and by scanners."""
    rng = random.Random(seed)
    now = utcnow()
    reasons = ["user_unknown"] * 6 + ["mailbox_full"] * 3 + ["blocked"] * 2 + ["spam_related"]
    batch: list[Event] = []
    quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
    for step in range(hours * 4, 0, -1):
        start = quarter - timedelta(minutes=15 * step)  # one 15-minute bucket of the chart
        hour = start.hour + start.minute / 60
        daylight = max(0.0, math.sin((hour - 6) / 24 * 2 * math.pi))
        volume = int(14 + 36 * daylight + rng.randint(0, 8))
        for _ in range(volume):
            at = start + timedelta(seconds=rng.randint(0, 899))
            tag = rng.choices(TAGS, weights=(5, 2, 3, 1, 1))[0]
            common = {"app_id": app_id, "tag": tag, "at": at}
            batch += [
                Event(type=EventType.MESSAGE_RECEIVED, **common),  # type: ignore[arg-type]
                Event(type=EventType.DELIVERY_QUEUED, **common),  # type: ignore[arg-type]
            ]
            roll = rng.random()
            if roll < 0.018:
                category = rng.choice(reasons)
                batch.append(
                    Event(
                        type=EventType.DELIVERY_BOUNCED,
                        data={"category": category, "hard": category == "user_unknown"},
                        **common,
                    )
                )  # type: ignore[arg-type]
                continue
            if roll < 0.06:
                batch.append(Event(type=EventType.DELIVERY_DEFERRED, **common))  # type: ignore[arg-type]
            batch.append(Event(type=EventType.DELIVERY_DELIVERED, **common))  # type: ignore[arg-type]
            later = {**common, "at": at + timedelta(minutes=rng.randint(1, 40))}
            if later["at"] < now and rng.random() < 0.42:
                batch.append(Event(type=EventType.MESSAGE_OPENED, bot=rng.random() < 0.15, **later))  # type: ignore[arg-type]
                if rng.random() < 0.22:
                    batch.append(Event(type=EventType.MESSAGE_CLICKED, **later))  # type: ignore[arg-type]
    with pb.store.write() as conn:
        record(conn, batch)


def test_screenshots(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]], tmp_path: Path
) -> None:
    pb = postbode
    shots = DOCS if UPDATE else tmp_path
    backdated_history(pb, pb.shop.app_id)
    tenancy.create_app(pb.store, "newsletter")
    script = pb.sink.script
    script.add(
        Rule.rcpt(
            "anna.devries@dest.test",
            "451 4.7.1 Greylisted, please try again in 300 seconds",
            "250 2.1.5 OK",
        )
    )
    script.add(
        Rule.rcpt(
            "nobody@dest.test",
            "550 5.1.1 The email account that you tried to reach does not exist.",
        )
    )
    waiting = []
    for domain, reply in REPLIES.items():
        for name in ("j.bakker", "m.visser", "s.smit", "l.meijer")[: 4 if "gmail" in domain else 2]:
            address = f"{name}@{domain}"
            script.add(Rule.rcpt(address, reply))
            waiting.append(address)
    pb.send(
        ["anna.devries@dest.test"],
        "Your order #10427 is confirmed",
        html=ORDER_HTML,
        headers={
            "X-Postbode-Tag": "order-confirmation",
            "X-Postbode-Metadata-order": "10427",
            "X-Postbode-Metadata-customer": "c-88213",
        },
        sender="Fietsenwinkel Jansen <orders@shop.test>",
    )
    for i, address in enumerate(waiting):
        pb.send(
            [address],
            f"Your parcel is on its way ({i + 1})",
            headers={"X-Postbode-Tag": "shipping-update"},
        )
    # Password resets and welcome mails are made from templates, through the API.
    manage.create_template(
        pb.store,
        pb.shop.app_id,
        "password-reset",
        subject="Reset your password",
        html='<p>Hi {{ name }}, <a href="https://shop.test/reset/{{ token }}">reset it</a>.</p>',
    )
    manage.create_template(
        pb.store,
        pb.shop.app_id,
        "welcome",
        subject="Welcome to Fietsenwinkel Jansen, {{ name }}",
        html="<p>Welcome, {{ name }}!</p>",
    )
    for i in range(12):
        alias = "password-reset" if i < 8 else "welcome"
        answer = httpx.post(
            f"{pb.base}/api/v1/messages",
            headers={"Authorization": f"Bearer {pb.shop.api_key}"},
            json={
                "from": "Fietsenwinkel Jansen <service@shop.test>",
                "to": [f"customer{i}@dest.test"],
                "template": alias,
                "model": {"name": f"Klant {i}", "token": f"t{i:04d}"},
                "tag": alias,
            },
        )
        assert answer.status_code == 202, answer.text
    pb.send(
        ["nobody@dest.test"],
        "Welcome to Fietsenwinkel Jansen",
        headers={"X-Postbode-Tag": "welcome"},
    )

    def settled() -> bool:
        with pb.store.read() as conn:
            pending = conn.execute(
                select(func.count()).where(deliveries.c.status.in_(("queued", "sending")))
            ).scalar_one()
            return pending == 0

    wait_for(settled, timeout=30)
    with pb.store.read() as conn:
        order = conn.execute(
            select(messages.c.id).where(messages.c.subject.like("Your order #10427%"))
        ).scalar_one()
    page, watch = open_page(pb.base, "owner@org.test")
    # The greylisted order confirmation is retried from its page, as an admin would.
    page.goto(f"{pb.base}/messages/{order}")
    page.locator("#recipients").get_by_role("button", name="Retry now").click()
    expect(page.locator(".flash")).to_contain_text("queued for a retry now")
    wait_for(lambda: _status(pb, "anna.devries@dest.test") == "delivered")

    shots.mkdir(parents=True, exist_ok=True)
    page.goto(f"{pb.base}/dashboard?app=shop&range=24h")
    expect(page.locator("body")).to_have_attribute("data-chart", "drawn")
    page.screenshot(path=str(shots / "dashboard.png"))

    page.goto(f"{pb.base}/messages/{order}")
    expect(page.frame_locator("iframe.preview").locator("h1")).to_contain_text("Thank you")
    page.locator("pre.transcript").last.scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shots / "message.png"))

    page.goto(f"{pb.base}/queue?app=shop&view=deferred")
    expect(page.locator("tr", has_text="j.bakker@gmail.test")).to_be_visible()
    page.screenshot(path=str(shots / "queue.png"))

    page.goto(f"{pb.base}/messages?app=shop")
    expect(page.locator(".match-count")).to_be_visible()
    page.screenshot(path=str(shots / "messages.png"))

    # On a phone (390 by 844): the navigation wraps, rows are cards, nothing scrolls sideways.
    phone, phone_watch = open_page(
        pb.base, "owner@org.test", viewport={"width": 390, "height": 844}
    )
    phone.goto(f"{pb.base}/dashboard?app=shop&range=24h")
    expect(phone.locator("body")).to_have_attribute("data-chart", "drawn")
    phone.screenshot(path=str(shots / "dashboard-mobile.png"))
    phone.goto(f"{pb.base}/messages?app=shop")
    expect(phone.locator(".match-count")).to_be_visible()
    phone.screenshot(path=str(shots / "messages-mobile.png"))
    names = ("dashboard", "message", "queue", "messages", "dashboard-mobile", "messages-mobile")
    for name in names:
        assert (shots / f"{name}.png").stat().st_size > 10_000
    assert watch.dialogs == [] and watch.errors == [] and watch.csp_violations() == []
    assert phone_watch.errors == [] and phone_watch.csp_violations() == []


def _status(pb: Postbode, recipient: str) -> str | None:
    with pb.store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()
