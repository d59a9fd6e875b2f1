"""The Inbound page: routes added (secret shown once) and removed, the log with search, a held
message's page with its verification, release; viewers see and cannot change."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

from sqlalchemy import insert, select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import audit_log, inbound_messages, new_id, routes, utcnow

from .conftest import Browser, Org

RAW = (
    b"From: Alice <alice@sender.test>\r\nTo: support@in.shop.test\r\n"
    b"Subject: Where is <b>my</b> lamp?\r\n\r\n"
    b"Still waiting.\r\n\r\nOn Mon, Shop wrote:\r\n> Soon\r\n"
)


def held_message(store: Store, app_id: int, route_id: int) -> str:
    inbound_id = new_id()
    now = utcnow()
    with store.write() as conn:
        conn.execute(
            insert(inbound_messages).values(
                id=inbound_id,
                app_id=app_id,
                route_id=route_id,
                action="hold",
                mail_from="bounces@sender.test",
                rcpt_to="support@in.shop.test",
                mailbox_hash="",
                from_header="Alice <alice@sender.test>",
                subject="Where is <b>my</b> lamp?",
                size=len(RAW),
                raw=zlib.compress(RAW),
                verification={
                    "spf": {"result": "pass", "domain": "sender.test", "detail": ""},
                    "dkim": [],
                    "dmarc": {"result": "none", "domain": "sender.test", "policy": None},
                    "header": "x",
                },
                status="held",
                attempts=0,
                next_attempt_at=now,
                received_at=now,
                queued_at=now,
            )
        )
    return str(inbound_id)


def test_routes_log_message_and_release(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    tenancy.add_domain(store, "shop", "in.shop.test", inbound=True)
    page = admin.get("/inbound?app=shop")
    assert page.status_code == 200 and "No routes yet" in page.text
    added = admin.post(
        "/inbound-routes?app=shop",
        {"match": "support@in.shop.test", "url": "https://app.test/in", "action": "hold"},
    )
    assert added.status_code == 200 and re.search(r"whsec_[A-Za-z0-9+/=]+", added.text)
    bad = admin.post(
        "/inbound-routes?app=shop", {"match": "x@elsewhere.test", "url": "https://a.test/"}
    )
    assert "not an inbound domain" in admin.flash(bad)
    with store.read() as conn:
        route_id = conn.execute(select(routes.c.id)).scalar_one()

    inbound_id = held_message(store, org.shop.app_id, route_id)
    log = admin.get("/inbound?app=shop&q=lamp").text
    assert f"/inbound/{inbound_id}" in log and "&lt;b&gt;my&lt;/b&gt;" in log  # escaped
    assert f"/inbound/{inbound_id}" not in admin.get("/inbound?app=shop&q=nothing").text
    assert f"/inbound/{inbound_id}" in admin.get("/inbound?app=shop&status=held").text
    assert admin.get("/inbound?app=shop&status=lost").status_code == 400

    message = admin.get(f"/inbound/{inbound_id}?app=shop")
    assert message.status_code == 200
    assert "Still waiting." in message.text and "Release to the route" in message.text
    assert "status-pass" in message.text  # SPF
    released = admin.post(f"/inbound/{inbound_id}/release?app=shop")
    assert admin.flash(released) == "The message is released to its route."
    with store.read() as conn:
        row = conn.execute(select(inbound_messages.c.status, inbound_messages.c.action)).one()
        actions = set(conn.execute(select(audit_log.c.action)).scalars())
    assert tuple(row) == ("pending", "post")
    assert {"route.create", "inbound.release"} <= actions
    again = admin.post(f"/inbound/{inbound_id}/release?app=shop")
    assert "not held" in admin.flash(again)

    removed = admin.post(f"/inbound-routes/{route_id}/remove?app=shop")
    assert "Route removed" in admin.flash(removed)
    assert "No routes yet" in admin.get("/inbound?app=shop").text


def test_viewers_see_and_cannot_change(ui: tuple[Store, Org, Callable], viewer: Browser) -> None:
    store, org, _ = ui
    tenancy.add_domain(store, "shop", "in.shop.test", inbound=True)
    from postbode.inbound.routes import create_route

    route = create_route(store, org.shop.app_id, "*@in.shop.test", action="hold")
    inbound_id = held_message(store, org.shop.app_id, route["id"])
    page = viewer.get(f"/inbound/{inbound_id}?app=shop")
    assert page.status_code == 200 and "Release to the route" not in page.text
    assert "Add a route" not in viewer.get("/inbound?app=shop").text
    assert viewer.post(f"/inbound/{inbound_id}/release?app=shop").status_code == 403
    assert viewer.get(f"/inbound/{new_id()}?app=shop").status_code == 404
