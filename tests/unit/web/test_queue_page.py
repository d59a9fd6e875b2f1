"""The queue page: groups, tabs, and changes to one delivery, a selection or a whole filter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from postbode.store.engine import Store
from postbode.store.schema import audit_log, deliveries, utcnow
from postbode.testing.factories import make_queued_message

from .conftest import Browser, Org


def deferred(store: Store, app_id: int, recipients: list[str], reply: str) -> list[Any]:
    _, ids = make_queued_message(store, app_id, recipients)
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(ids))
            .values(status="deferred", attempts=1, last_reply=reply, last_attempt_at=utcnow())
        )
    return ids


def statuses(store: Store) -> dict[str, str]:
    with store.read() as conn:
        return dict(conn.execute(select(deliveries.c.recipient, deliveries.c.status)).all())


def test_groups_and_tabs(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    deferred(store, org.shop.app_id, ["a@grey.test", "b@grey.test"], "451 4.7.1 Greylisted")
    deferred(store, org.shop.app_id, ["c@full.test"], "452 4.2.2 Mailbox full")
    page = admin.get("/queue").text
    assert "grey.test" in page and "451 4.7.1 Greylisted" in page and "452 4.2.2" in page
    only = admin.get("/queue?view=deferred&domain=grey.test").text
    assert "a@grey.test" in only and "c@full.test" not in only
    assert "Nothing waits here." in admin.get("/queue?view=held").text


def test_retry_everything_matching_after_a_counted_confirmation(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, org, _ = ui
    deferred(store, org.shop.app_id, ["a@grey.test", "b@grey.test"], "451 4.7.1 Greylisted")
    deferred(store, org.shop.app_id, ["c@full.test"], "452 4.2.2 Mailbox full")
    form = {"action": "retry", "view": "deferred", "domain": "grey.test", "tag": ""}
    ask = admin.post("/queue/confirm?app=shop&scope=filter", form)
    assert ask.status_code == 200 and "Retry 2 deliveries?" in ask.text
    assert statuses(store)["a@grey.test"] == "deferred"  # asking changes nothing
    done = admin.post("/queue/apply?app=shop", {**form, "scope": "filter"})
    assert admin.flash(done) == "2 deliveries retried."
    assert statuses(store) == {
        "a@grey.test": "queued",
        "b@grey.test": "queued",
        "c@full.test": "deferred",
    }
    with store.read() as conn:
        entry = conn.execute(
            select(audit_log.c.action, audit_log.c.target, audit_log.c.data).where(
                audit_log.c.action == "deliveries.retry"
            )
        ).one()
    assert entry.target == "shop" and entry.data["changed"] == 2
    assert entry.data["recipient_domain"] == "grey.test"


def test_cancel_a_selection(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    ids = deferred(store, org.shop.app_id, ["a@x.test", "b@x.test", "c@x.test"], "451 later")
    form = {"action": "cancel", "view": "waiting", "ids": [str(ids[0]), str(ids[2])]}
    ask = admin.post("/queue/confirm?app=shop&scope=selected", form)
    assert "Cancel 2 deliveries?" in ask.text
    assert ask.text.count('name="ids"') == 2
    admin.post("/queue/apply?app=shop", {**form, "scope": "selected"})
    assert statuses(store) == {
        "a@x.test": "cancelled",
        "b@x.test": "deferred",
        "c@x.test": "cancelled",
    }
    # Nothing ticked: back to the queue with a notice, not an error page.
    nothing = admin.post("/queue/confirm?app=shop&scope=selected", {"action": "cancel"})
    assert nothing.status_code == 303 and "Nothing selected" in admin.flash(nothing)


def test_an_action_that_fits_no_state_of_the_tab_is_refused(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    response = admin.post(
        "/queue/confirm?app=shop&scope=filter", {"action": "release", "view": "deferred"}
    )
    assert response.status_code == 422 and "applies to held" in response.text
    assert (
        admin.post("/queue/confirm?app=shop&scope=filter", {"action": "explode"}).status_code == 400
    )


def test_one_delivery(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    (one,) = deferred(store, org.shop.app_id, ["a@x.test"], "451 later")
    done = admin.post(f"/queue/{one}/retry?app=shop", {"view": "deferred"})
    assert done.headers["location"] == "/queue?app=shop&view=deferred"
    assert admin.flash(done) == "Delivery to a@x.test retried."
    assert statuses(store) == {"a@x.test": "queued"}
    refused = admin.post(f"/queue/{one}/release?app=shop")
    assert "the delivery is queued; release applies to held" in admin.flash(refused)
