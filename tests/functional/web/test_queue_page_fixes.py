"""The queue page in headless Chromium: its action buttons are all in view at 1440 px, a held
delivery shows why it is held, one cancel asks first, and "Retry selected" with nothing
ticked says so on the queue page instead of an error page."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select, update

from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.schema import deliveries
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")

GREYLIST = (
    "451 4.7.1 Greylisted: this server has not seen mail from this sender and address pair "
    "before; please try again later, as every well-behaved mail server does"
)


def _status(pb: Postbode, recipient: str) -> str | None:
    with pb.store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()


def _queue_with_a_deferred_and_a_held(pb: Postbode) -> None:
    pb.sink.script.add(Rule.rcpt(None, GREYLIST))
    for name in ("grey", "kept"):
        pb.send([f"{name}-with-a-rather-long-address@example-destination.test"], f"For {name}")
    for name in ("grey", "kept"):
        address = f"{name}-with-a-rather-long-address@example-destination.test"
        wait_for(lambda a=address: _status(pb, a) == "deferred")  # type: ignore[misc]
    # Held for review, as an operator or a detector holds mail: the reason is in its event.
    address = "kept-with-a-rather-long-address@example-destination.test"
    with pb.store.write() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.recipient == address)).one()
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == row.id)
            .values(status="held", last_reply=None)
        )
        record(
            conn,
            Event(
                type=EventType.DELIVERY_HELD,
                app_id=row.app_id,
                message_id=row.message_id,
                delivery_id=row.id,
                recipient=address,
                data={"reason": "held for review: sending spike"},
            ),
        )


def test_queue_actions_in_view_hold_reason_and_confirmations(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    _queue_with_a_deferred_and_a_held(postbode)
    page, watch = open_page(
        postbode.base, "admin@org.test", viewport={"width": 1440, "height": 900}
    )
    page.goto(f"{postbode.base}/queue")
    buttons = page.locator("td.actions-col button")
    expect(buttons.first).to_be_visible()
    assert buttons.count() >= 4
    for i in range(buttons.count()):
        box = buttons.nth(i).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 1440, box
    overflow = page.evaluate(
        "[...document.querySelectorAll('.scroll')].map(e => e.scrollWidth - e.clientWidth)"
    )
    assert all(o <= 0 for o in overflow), overflow
    assert page.evaluate("document.documentElement.scrollWidth") <= 1440

    # The held delivery says why.
    held = page.locator("tr", has_text="kept-with-a-rather-long-address")
    expect(held).to_contain_text("held for review: sending spike")
    expect(page.locator("body")).not_to_contain_text("(no reply)")

    # One cancel asks first; dismissed, nothing changes.
    grey = "grey-with-a-rather-long-address@example-destination.test"
    row = page.locator("tr", has_text=grey)
    row.get_by_role("button", name="Cancel").click()
    assert len(watch.dialogs) == 1 and grey in watch.dialogs[0]
    assert _status(postbode, grey) == "deferred"
    page.evaluate("window.confirm = () => true")
    row.get_by_role("button", name="Cancel").click()
    expect(page.locator(".flash")).to_contain_text("cancelled")
    assert _status(postbode, grey) == "cancelled"

    # "Retry selected" with nothing ticked: a notice on the queue page.
    page.get_by_role("button", name="Retry selected").click()
    expect(page.locator("h1")).to_have_text("Queue")
    expect(page.locator(".flash")).to_contain_text("Nothing selected")
    assert watch.errors == []
