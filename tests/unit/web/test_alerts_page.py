"""Holding and releasing an app from the UI, the held banner and the Alerts page."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, select

from postbode.abuse import alerts, limits
from postbode.store.engine import Store
from postbode.store.schema import audit_log, stat_counters, system_values

from .conftest import Browser, Org


def test_hold_release_banner_and_alerts(
    ui: tuple[Store, Org, Callable], admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    assert "is held" not in admin.get("/settings/apps/shop").text
    assert "No alerts." in admin.get("/alerts").text
    # viewers may look, not hold
    assert viewer.post("/settings/apps/shop/hold", {"reason": "x"}).status_code == 403
    assert "Give a reason" in admin.flash(admin.post("/settings/apps/shop/hold", {"reason": ""}))
    held = admin.post("/settings/apps/shop/hold", {"reason": "bounces look wrong"})
    assert "shop is held" in admin.flash(held)
    page = viewer.get("/dashboard").text  # the banner is on every page, for everyone
    assert "shop is held" in page and "bounces look wrong" in page
    assert "Release held mail" not in viewer.get("/settings/apps/shop").text
    assert "Release held mail" in admin.get("/settings/apps/shop").text

    alerts.raise_alert(
        store, org.shop.app_id, "complaint_rate", {"rate": 0.004, "threshold": 0.003}, held=True
    )
    listing = viewer.get("/alerts").text
    assert "complaint_rate" in listing and "0.004" in listing
    released = admin.post("/settings/apps/shop/release", {"back": "/alerts"})
    assert released.headers["location"] == "/alerts"
    assert "shop released" in admin.flash(released)
    assert "is held" not in viewer.get("/dashboard").text
    assert admin.post("/settings/apps/nope/release").status_code == 404
    with store.read() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.action).where(
                audit_log.c.action.in_(("app.hold", "app.release"))
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("admin@org.test", "app.hold"),
        ("admin@org.test", "app.release"),
    ]


def test_sending_limits_on_the_app_page(
    ui: tuple[Store, Org, Callable], admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    assert viewer.post("/settings/apps/shop/limits", {"per_minute": "5"}).status_code == 403
    saved = admin.post(
        "/settings/apps/shop/limits", {"per_minute": "100", "per_hour": "", "per_day": "5000"}
    )
    assert "Sending limits saved" in admin.flash(saved)
    with store.read() as conn:
        assert limits.get_limits(conn, org.shop.app_id) == limits.Limits(100, None, 5000)
    page = viewer.get("/settings/apps/shop").text
    assert 'name="per_minute" min="0" max="2147483647" value="100"' in page
    bad = admin.post("/settings/apps/shop/limits", {"per_minute": "-3"})
    assert "per_minute" in admin.flash(bad)
    with store.read() as conn:
        assert limits.get_limits(conn, org.shop.app_id).per_minute == 100


def test_the_alerts_page_shows_what_the_detectors_see(
    ui: tuple[Store, Org, Callable], viewer: Browser
) -> None:
    store, org, _ = ui
    with store.write() as conn:  # an earlier test's release of an app with the same id
        conn.execute(delete(system_values).where(system_values.c.name.like("abuse.%")))
    page = viewer.get("/alerts").text
    assert "What the detectors see" in page and "no history" in page and "not judged" in page
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    rows = [
        (hour - timedelta(weeks=1), "message.received", 120),
        (now.replace(second=0, microsecond=0), "message.received", 42),
        (now.replace(second=0, microsecond=0), "delivery.delivered", 300),
        (now.replace(second=0, microsecond=0), "message.complained", 3),
    ]
    with store.write() as conn:
        conn.execute(
            insert(stat_counters),
            [
                {
                    "app_id": org.shop.app_id,
                    "stream": "transactional",
                    "tag": "",
                    "bucket": at,
                    "event_type": kind,
                    "count": n,
                    "bot_count": 0,
                }
                for at, kind, n in rows
            ],
        )
    page = viewer.get("/alerts?app=shop").text
    assert "42.0/min" in page and "2.0/min" in page and "100/min" in page
    row = page[page.index('id="abuse-figures"') :][:3000]
    assert "1.00 % of 300" in row, row  # complaints: 3 of 300 delivered
