"""Apps, credentials, domains, webhooks, tracking and retention, as the settings pages do them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from postbode import tenancy
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import apps, audit_log, webhook_requests
from postbode.testing.dns import LoopbackDNS

from .conftest import Browser, Org


def secrets_shown(page: str) -> list[str]:
    return re.findall(r'<code class="secret" id="secret-\d+">([^<]+)</code>', page)


def actions(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(select(audit_log.c.action).order_by(audit_log.c.id)).scalars())


def test_create_an_app_and_its_secrets_are_shown_once(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, _, _ = ui
    page = admin.post("/settings/apps", {"name": "billing"})
    assert page.status_code == 200 and "cannot show them again" in page.text
    api_key, username, password = secrets_shown(page.text)
    assert tenancy.authenticate_api_key(store, api_key) is not None
    assert tenancy.authenticate_smtp(store, username, password) is not None
    assert page.headers["cache-control"] == "no-store"
    listing = admin.get("/settings").text
    assert "billing" in listing and api_key not in listing
    assert api_key not in admin.get("/settings/apps/billing").text
    bad = admin.post("/settings/apps", {"name": "Not Valid!"})
    assert "invalid app name" in admin.flash(bad)
    assert actions(store)[-1] == "app.create"


def test_create_and_revoke_credentials(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, _, _ = ui
    page = admin.post("/settings/apps/shop/credentials", {"kind": "api", "name": "checkout"})
    (key,) = secrets_shown(page.text)
    assert key.startswith("pb_") and tenancy.authenticate_api_key(store, key) is not None
    smtp = admin.post("/settings/apps/shop/credentials", {"kind": "smtp", "name": "relay"})
    assert len(secrets_shown(smtp.text)) == 2
    listing = admin.get("/settings/apps/shop").text
    assert "checkout" in listing and key not in listing
    lookup = key[3:].split("_", 1)[0]
    cred_id = next(
        c["id"] for c in tenancy.list_credentials(store, "shop") if c["lookup"] == lookup
    )
    revoked = admin.post(f"/settings/apps/shop/credentials/{cred_id}/revoke")
    assert "revoked" in admin.flash(revoked)
    assert tenancy.authenticate_api_key(store, key) is None
    assert "no active credential" in admin.flash(
        admin.post(f"/settings/apps/shop/credentials/{cred_id}/revoke")
    )
    assert admin.post("/settings/apps/nope/credentials", {"kind": "api"}).status_code == 404
    assert actions(store)[-3:] == ["credential.create", "credential.create", "credential.revoke"]


def test_domains_with_the_records_to_publish(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, _, _ = ui
    added = admin.post("/settings/apps/shop/domains", {"domain": "Mail.Shop.test"})
    assert "mail.shop.test added" in admin.flash(added)
    page = admin.get("/settings/apps/shop/domains").text
    for shown in (
        "v=spf1 a:",
        "._domainkey.mail.shop.test",
        "v=DKIM1; k=rsa; p=",
        "pb-bounces.mail.shop.test",
        "_dmarc.mail.shop.test",
    ):
        assert shown in page, shown
    assert "not checked" in page
    assert "already registered" in admin.flash(
        admin.post("/settings/apps/shop/domains", {"domain": "mail.shop.test"})
    )
    assert actions(store)[-1] == "domain.add"


def test_webhooks_their_log_and_replay(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    created = admin.post(
        "/settings/apps/shop/webhooks",
        {"url": "https://hooks.test/in", "event_types": ["delivery.bounced"], "enabled": "on"},
    )
    (secret,) = secrets_shown(created.text)
    assert secret.startswith("whsec_")
    hook_id = int(re.search(r"/webhooks/(\d+)", created.text).group(1))  # type: ignore[union-attr]
    event_id = uuid.uuid4()
    with store.write() as conn:
        record(
            conn,
            Event(
                app_id=org.shop.app_id,
                type=EventType.DELIVERY_BOUNCED,
                id=event_id,
                recipient="a@dest.test",
                data={"category": "user_unknown"},
            ),
        )
    page = admin.get(f"/settings/apps/shop/webhooks/{hook_id}").text
    assert "delivery.bounced" in page and "pending" in page and "Replay" in page
    replayed = admin.post(
        f"/settings/apps/shop/webhooks/{hook_id}/replay", {"event_id": str(event_id)}
    )
    assert admin.flash(replayed) == f"Event {event_id} queued for the endpoint again."
    with store.read() as conn:
        assert len(conn.execute(select(webhook_requests.c.id)).all()) == 2
    changed = admin.post(
        f"/settings/apps/shop/webhooks/{hook_id}/update", {"url": "https://hooks.test/v2"}
    )
    assert admin.flash(changed) == "Webhook saved."
    page = admin.get(f"/settings/apps/shop/webhooks/{hook_id}").text
    assert "https://hooks.test/v2" in page and "disabled" in page
    refused = admin.post(
        f"/settings/apps/shop/webhooks/{hook_id}/replay", {"event_id": str(event_id)}
    )
    assert "disabled" in admin.flash(refused)
    rotated = admin.post(f"/settings/apps/shop/webhooks/{hook_id}/rotate")
    assert secrets_shown(rotated.text)[0] != secret
    bad = admin.post("/settings/apps/shop/webhooks", {"url": "ftp://x.test/"})
    assert "http:// or https://" in admin.flash(bad)
    deleted = admin.post(f"/settings/apps/shop/webhooks/{hook_id}/delete")
    assert admin.flash(deleted) == "Webhook deleted."
    assert admin.get(f"/settings/apps/shop/webhooks/{hook_id}").status_code == 404
    assert actions(store)[-5:] == [
        "webhook.create",
        "webhook.replay",
        "webhook.update",
        "webhook.rotate",
        "webhook.delete",
    ]


def test_tracking_and_retention(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    saved = admin.post(
        "/settings/apps/shop/tracking",
        {
            "track_opens": "on",
            "raw_retention_days": "5",
            "metadata_retention_days": "60",
            "max_message_age_hours": "48",
        },
    )
    assert "Saved" in admin.flash(saved)
    with store.read() as conn:
        row = conn.execute(select(apps).where(apps.c.id == org.shop.app_id)).mappings().one()
        data = conn.execute(
            select(audit_log.c.data).where(audit_log.c.action == "app.settings")
        ).scalar_one()
    assert (row["track_opens"], row["track_clicks"]) == (True, False)
    assert (row["raw_retention_days"], row["metadata_retention_days"]) == (5, 60)
    assert row["max_message_age_seconds"] == 48 * 3600
    assert data["raw_retention_days"] == [7, 5] and "track_clicks" not in data
    for field, value in (
        ("raw_retention_days", "0"),
        ("metadata_retention_days", "x"),
        ("max_message_age_hours", "9999"),
    ):
        form = {"raw_retention_days": "7", "metadata_retention_days": "60", field: value}
        assert admin.post("/settings/apps/shop/tracking", form).status_code == 422, field
    page = admin.get("/settings/apps/shop/tracking").text
    assert 'name="track_opens" checked' in page and 'value="48"' in page


def test_a_viewer_sees_settings_read_only(viewer: Browser) -> None:
    page = viewer.get("/settings/apps/shop/tracking").text
    assert "<fieldset disabled>" in page and ">Save</button>" not in page


def test_check_a_domains_dns_live(
    sqlite_store: Store, make_ui: Callable[..., tuple[Any, Callable[[], Browser]]]
) -> None:
    with LoopbackDNS() as dns:
        settings, browser = make_ui(sqlite_store, dns_nameservers=dns.nameserver)
        Org(sqlite_store)
        domain = tenancy.add_domain(sqlite_store, "shop", "shop.test")
        records = {
            r["purpose"]: r
            for r in tenancy.dns_records(
                domain, settings.smtp_hostname, settings.return_path_domain
            )
        }
        dns.add_txt(records["dkim"]["name"], records["dkim"]["value"])
        dns.add_cname(records["return_path"]["name"], records["return_path"]["value"])
        dns.add_txt("shop.test", "v=spf1 include:elsewhere.test -all")
        admin = browser()
        admin.login("admin@org.test")
        page = admin.post(f"/settings/apps/shop/domains/{domain['id']}/check")
    assert page.status_code == 200 and "checked just now" in page.text
    assert page.text.count('class="badge check-pass">pass<') == 2
    assert 'class="badge check-wrong">wrong<' in page.text  # SPF, with what was found
    assert "v=spf1 include:elsewhere.test -all" in page.text
    assert 'class="badge check-missing">missing<' in page.text  # DMARC
    assert 'class="badge check-pass">verified<' in page.text
    later = admin.get("/settings/apps/shop/domains").text
    assert "v=spf1 include:elsewhere.test" not in later  # found values are shown live only
    assert 'class="badge check-wrong">wrong<' in later
    assert actions(sqlite_store)[-1] == "domain.check"
    assert admin.post("/settings/apps/shop/domains/999/check").status_code == 404
