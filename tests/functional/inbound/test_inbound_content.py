"""Inbound mail scored by a private rspamd: GTUBE is refused at the end of DATA with 550 5.7.1,
a message between the hold and reject scores is stored held (score and symbols kept, reason
shown) until released to its route, a plain message goes straight to the app."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.inbound import manage
from postbode.store.engine import Store
from postbode.testing.rspamd import CONTENT_RULE, GTUBE, MIDDLE_MARKER, MIDDLE_SCORE, Rspamd

from .conftest import Endpoint, InboundPostbode
from .test_inbound import add_route, inbound_rows, send, wait_status

# One private rspamd per test session: its tests share an xdist worker.
pytestmark = pytest.mark.xdist_group("rspamd")


@pytest.fixture
def scanning(
    inbound_settings: Settings, store: Store, shop: tenancy.NewApp, rspamd: Rspamd
) -> Iterator[InboundPostbode]:
    running = InboundPostbode(inbound_settings.model_copy(update={"rspamd_url": rspamd.url}), store)
    yield running
    running.close()


def letter(subject: str, body: str = "Where is my parcel?") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@sender.test>"
    msg["To"] = "support@in.shop.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@sender.test>"
    msg["Date"] = "Mon, 07 Dec 2026 10:05:00 +0100"
    msg.set_content(body)
    return msg.as_bytes()


def test_inbound_gtube_refused_middle_held_with_symbols_plain_posted(
    scanning: InboundPostbode, store: Store, shop: tenancy.NewApp, endpoint: Endpoint
) -> None:
    add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    scanning.refresh()

    code, text = send(scanning, letter("Test", f"Spam: {GTUBE}"), "support@in.shop.test")
    assert code == 550 and text.decode().startswith("5.7.1") and b"GTUBE" in text
    assert inbound_rows(store) == []

    assert send(scanning, letter(f"Hi {MIDDLE_MARKER}"), "support@in.shop.test")[0] == 250
    [held] = wait_status(store, "held")
    assert 6 <= held.spam_score < 15
    assert held.last_error.startswith(f"content score {held.spam_score:g} (hold at 6)")
    [rule] = [s for s in held.spam_symbols if s["name"] == CONTENT_RULE]
    assert rule["score"] == MIDDLE_SCORE

    assert send(scanning, letter("Where is my parcel?"), "support@in.shop.test")[0] == 250
    [posted] = endpoint.wait_for(1)
    assert b"Where is my parcel?" in posted.body and MIDDLE_MARKER.encode() not in posted.body
    [delivered] = wait_status(store, "delivered")
    assert delivered.spam_score is not None and delivered.spam_score < 6

    manage.release(store, shop.app_id, held.id)
    scanning.notify()
    assert MIDDLE_MARKER.encode() in endpoint.wait_for(2)[1].body
