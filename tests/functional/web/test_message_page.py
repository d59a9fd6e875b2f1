"""A message's page in headless Chromium: absolute times with relative hints, identical
consecutive attempts folded into one ("3 x 451 4.7.1 ..., from-to"), newest first, and a
transcript that wraps with the refusing line highlighted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select, update

from postbode.delivery import manage
from postbode.store.schema import attempts, deliveries, messages
from postbode.testing.sink import Rule

from .conftest import Postbode, Watch, wait_for

pytestmark = pytest.mark.xdist_group("browser")

GREY = "451 4.7.1 Greylisted, " + "please come back later " * 6


def _attempts(pb: Postbode) -> int:
    with pb.store.read() as conn:
        return len(conn.execute(select(attempts.c.id)).all())


def test_repeated_attempts_fold_and_the_refusal_is_highlighted(
    postbode: Postbode, open_page: Callable[..., tuple[Page, Watch]]
) -> None:
    postbode.sink.script.add(
        Rule.rcpt("late@dest.test", GREY, GREY, GREY, "550 5.7.1 Rejected after all")
    )
    postbode.send(["late@dest.test"], "Try and try again")
    with postbode.store.read() as conn:
        wait_for(lambda: _attempts(postbode) == 1)
        delivery = conn.execute(select(deliveries.c.id)).scalar_one()
        app_id = conn.execute(select(messages.c.app_id)).scalar_one()
    for n in (2, 3, 4):  # retried at once, as the queue page's "Retry" does
        manage.change_one(postbode.store, app_id, delivery, "retry", by="test")
        wait_for(lambda n=n: _attempts(postbode) == n)  # type: ignore[misc]
    # Spread the attempts over hours, as greylisting retries are.
    with postbode.store.write() as conn:
        rows = conn.execute(
            select(attempts.c.id, attempts.c.started_at).order_by(attempts.c.started_at)
        ).all()
        for i, row in enumerate(rows):
            conn.execute(
                update(attempts)
                .where(attempts.c.id == row.id)
                .values(started_at=row.started_at - timedelta(hours=3 - i))
            )
    page, watch = open_page(postbode.base, "owner@org.test", viewport={"width": 900, "height": 900})
    page.goto(f"{postbode.base}/messages?subject=Try")
    page.get_by_role("link", name="Try and try again").click()
    groups = page.locator("article.attempt")
    expect(groups).to_have_count(2)
    # Newest first: the final refusal, then the three greylistings folded into one.
    expect(groups.nth(0)).to_contain_text("550 5.7.1 Rejected after all")
    expect(groups.nth(1).locator(".repeat")).to_contain_text("3 \u00d7")
    expect(groups.nth(1).locator(".repeat")).to_contain_text("451 4.7.1 Greylisted")
    expect(groups.nth(1).locator(".repeat")).to_contain_text("\u2013")
    # Absolute times, with how long ago.
    expect(groups.nth(0).locator(".attempt-head")).to_contain_text("UTC")
    expect(groups.nth(0).locator(".attempt-head")).to_contain_text("ago")
    # The transcript wraps (no sideways scrolling) and marks the refusal.
    transcript = groups.nth(0).locator("pre.transcript")
    expect(transcript.locator("mark.fail-line")).to_contain_text("550 5.7.1")
    groups.nth(1).locator("summary").click()
    long = groups.nth(1).locator("pre.transcript")
    expect(long.locator("mark.fail-line")).to_contain_text("451 4.7.1")
    assert long.evaluate("e => e.scrollWidth <= e.clientWidth")
    assert watch.errors == []
