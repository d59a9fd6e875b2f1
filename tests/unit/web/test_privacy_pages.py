"""Privacy in the UI: looking at a message's content, its raw source and exporting CSV are
audited; the audit log is the owners' (admins see their own actions, viewers none); owners
erase and export a person and set the retention defaults, each audited."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import func, select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import apps, audit_log, deliveries, organizations, raw_messages
from postbode.testing.factories import make_queued_message

from .conftest import Browser, Org


def _audit(store: Store, action: str) -> list[dict[str, object]]:
    with store.read() as conn:
        return [
            dict(r)
            for r in conn.execute(
                select(audit_log).where(audit_log.c.action == action).order_by(audit_log.c.id)
            ).mappings()
        ]


def test_looking_at_a_message_and_exporting_are_audited(
    ui: tuple[Store, Org, Callable[[], Browser]], viewer: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["ann@x.test"])
    assert viewer.get(f"/messages/{message_id}").status_code == 200
    assert viewer.get(f"/messages/{message_id}/raw").status_code == 200
    assert viewer.get("/messages/export.csv?recipient=ann@x.test").status_code == 200
    assert viewer.get("/suppressions/export.csv?app=shop").status_code == 200
    (looked,) = _audit(store, "access.message")
    assert (looked["actor"], looked["target"], looked["user_id"]) == (
        "viewer@org.test",
        str(message_id),
        org.viewer_id,
    )
    assert looked["ip"] == "testclient" and looked["data"] == {"app": "shop"}
    assert [r["target"] for r in _audit(store, "access.message_raw")] == [str(message_id)]
    exports = _audit(store, "access.export_csv")
    assert [(r["target"], r["data"]) for r in exports] == [
        ("messages", {"recipient": "ann@x.test"}),
        ("suppressions:shop", {}),
    ]


def test_who_reads_the_audit_log(
    ui: tuple[Store, Org, Callable[[], Browser]], owner: Browser, admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["ann@x.test"])
    owner.get(f"/messages/{message_id}")
    admin.get(f"/messages/{message_id}")
    assert viewer.get("/audit").status_code == 403  # viewers: none of it
    mine = admin.get("/audit?action=access.").text
    assert "admin@org.test" in mine and "owner@org.test" not in mine  # admins: their own
    everyone = owner.get("/audit?action=access.").text
    assert everyone.count("access.message") == 2
    assert "admin@org.test" in everyone and "owner@org.test" in everyone
    by_target = owner.get(f"/audit?target={message_id}&actor=admin@org.test").text
    assert by_target.count("access.message") == 1
    assert "access.message" not in owner.get("/audit?since=2999-01-01T00:00").text


def test_owners_erase_and_export_a_person(
    ui: tuple[Store, Org, Callable[[], Browser]], owner: Browser, admin: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["Ann@X.test", "bo@x.test"])
    assert admin.get("/privacy").status_code == 403
    assert admin.post("/privacy/erase", {"email": "ann@x.test"}).status_code == 403
    exported = owner.post("/privacy/export", {"email": "ann@x.test"})
    assert exported.status_code == 200
    doc = json.loads(exported.content)
    assert doc["counts"]["deliveries"] == 1 and doc["messages"][0]["id"] == str(message_id)
    preview = owner.post("/privacy/erase", {"email": "ann@x.test", "action": "preview"})
    assert preview.status_code == 200 and "bodies" in preview.text
    unconfirmed = owner.post("/privacy/erase", {"email": "ann@x.test", "action": "erase"})
    assert "Tick the confirmation" in unconfirmed.text
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(raw_messages)).scalar_one() == 1
    done = owner.post("/privacy/erase", {"email": "ann@x.test", "action": "erase", "confirm": "on"})
    assert "Erased" in owner.flash(done)
    with store.read() as conn:
        recipients = sorted(conn.execute(select(deliveries.c.recipient)).scalars())
        assert conn.execute(select(func.count()).select_from(raw_messages)).scalar_one() == 0
    assert recipients[0] == "bo@x.test" and recipients[1].startswith("hmac:")
    (erased,) = _audit(store, "privacy.erase")
    assert erased["actor"] == "owner@org.test" and erased["target"].startswith("hmac:")
    assert "ann@x.test" not in json.dumps(erased["data"])
    (exported_record,) = _audit(store, "privacy.export")
    assert exported_record["target"] == erased["target"]


def test_retention_changes_are_audited(
    ui: tuple[Store, Org, Callable[[], Browser]], owner: Browser
) -> None:
    store, org, _ = ui
    owner.get("/privacy")
    saved = owner.post(
        "/privacy/retention",
        {
            "raw_retention_days": "3",
            "metadata_retention_days": "30",
            "audit_retention_days": "400",
            "apply": "on",
        },
    )
    assert owner.flash(saved) == "Retention saved."
    with store.read() as conn:
        org_row = conn.execute(select(organizations)).mappings().one()
        app_row = conn.execute(select(apps).where(apps.c.id == org.shop.app_id)).mappings().one()
    assert (org_row["raw_retention_days"], org_row["audit_retention_days"]) == (3, 400)
    assert (app_row["raw_retention_days"], app_row["metadata_retention_days"]) == (3, 30)
    later = tenancy.create_app(store, "later")  # a new app starts with the defaults
    with store.read() as conn:
        fresh = conn.execute(select(apps).where(apps.c.id == later.app_id)).mappings().one()
    assert (fresh["raw_retention_days"], fresh["metadata_retention_days"]) == (3, 30)
    owner.get("/settings/apps/shop/tracking")
    owner.post(
        "/settings/apps/shop/tracking",
        {
            "raw_retention_days": "5",
            "metadata_retention_days": "30",
            "no_bodies": "on",
            "tracking_off": "on",
        },
    )
    with store.read() as conn:
        app_row = conn.execute(select(apps).where(apps.c.id == org.shop.app_id)).mappings().one()
    assert app_row["store_bodies"] is False and app_row["tracking_allowed"] is False
    records = _audit(store, "privacy.retention")
    assert [r["target"] for r in records] == ["default", "shop"]
    assert records[1]["data"] == {"raw_retention_days": [3, 5], "store_bodies": [True, False]}
