"""The tracking endpoints: pixel and redirect answered at once, hits recorded as events with bot
verdicts and anonymised addresses, forged tokens refused, one-click unsubscribe (RFC 8058)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import (
    deliveries,
    events,
    messages,
    stat_counters,
    suppressions,
    utcnow,
    webhook_requests,
)
from postbode.testing.factories import make_app, make_queued_message
from postbode.tracking import tokens
from postbode.tracking.endpoints import PIXEL, fast_path
from postbode.tracking.rewrite import tracking_key
from postbode.tracking.tokens import Token
from postbode.web.app import create_app
from postbode.webhooks import manage

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


class Tracked:
    """An app, one delivered message, and a client for the HTTP app."""

    def __init__(self, client: TestClient, store: Store, key: bytes, app: FastAPI) -> None:
        self.client, self.store, self.key, self.http_app = client, store, key, app
        self.app = make_app(store)
        self.message_id, (self.delivery_id,) = make_queued_message(
            store, self.app.app_id, ["Alice@dest.test"]
        )
        self.delivered(ago=3600)

    def delivered(self, ago: float) -> None:
        with self.store.write() as conn:
            conn.execute(
                update(deliveries).values(
                    status="delivered", last_attempt_at=utcnow() - timedelta(seconds=ago)
                )
            )

    def token(self, kind: str, url: str | None = None, link: int = 0, links: int = 1) -> str:
        return tokens.encode(Token(kind, self.delivery_id, url, link, links), self.key)  # type: ignore[arg-type]

    def get(self, path: str, user_agent: str = CHROME, **kw: Any) -> Any:
        return self.client.get(
            path, headers={"user-agent": user_agent}, follow_redirects=False, **kw
        )

    def events(self, kind: str) -> list[dict[str, Any]]:
        recorder = self.http_app.state.tracking
        self.client.portal.call(recorder.flush)  # type: ignore[union-attr]
        with self.store.read() as conn:
            rows = conn.execute(
                select(events).where(events.c.type == kind).order_by(events.c.id)
            ).mappings()
            return [dict(r) for r in rows]


@pytest.fixture
def tracked(settings: Settings, store: Store) -> Iterator[Tracked]:
    app = create_app(settings, store)
    with TestClient(app, client=("203.0.113.77", 40000)) as client:
        yield Tracked(client, store, tracking_key(settings, store), app)


def test_click_redirects_and_records(tracked: Tracked) -> None:
    url = "https://shop.test/orders/42?a=1&b=2#top"
    response = tracked.get(f"/t/c/{tracked.token('click', url, 0, 1)}")
    assert response.status_code == 302 and response.headers["location"] == url
    assert "no-store" in response.headers["cache-control"]
    (event,) = tracked.events("message.clicked")
    assert event["delivery_id"] == tracked.delivery_id and event["recipient"] == "Alice@dest.test"
    assert event["data"] == {
        "url": url,
        "link": 0,
        "bot": False,
        "bot_reason": None,
        "user_agent": "Chrome",  # the family only, never the version or platform
        "ip": "203.0.113.0",  # the last octet is never stored
    }


def test_a_repeated_click_counts_once_and_keeps_its_raw_hits(tracked: Tracked) -> None:
    """A click and five reloads of it: six raw hits, one click in the statistics and the
    webhooks; another link, or the same one after the window, counts again."""
    manage.create_webhook(tracked.store, tracked.app.app_id, "https://hooks.example.com/in")
    first = tracked.token("click", "https://shop.test/a", 0, 2)
    for _ in range(6):
        assert tracked.get(f"/t/c/{first}").status_code == 302
    tracked.get(f"/t/c/{tracked.token('click', 'https://shop.test/b', 1, 2)}")
    clicks = tracked.events("message.clicked")
    assert len(clicks) == 7
    assert [bool(e["data"].get("repeat")) for e in clicks] == [False, *[True] * 5, False]
    assert counted_clicks(tracked.store) == 2
    with tracked.store.read() as conn:
        told = conn.execute(
            select(func.count())
            .select_from(webhook_requests)
            .join(events, events.c.id == webhook_requests.c.event_id)
            .where(events.c.type == "message.clicked")
        ).scalar_one()
    assert told == 2
    with tracked.store.write() as conn:  # the window passes
        conn.execute(update(events).values(created_at=utcnow() - timedelta(minutes=2)))
    tracked.get(f"/t/c/{first}")
    assert not tracked.events("message.clicked")[-1]["data"].get("repeat")
    assert counted_clicks(tracked.store) == 3


def counted_clicks(store: Store) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                select(func.coalesce(func.sum(stat_counters.c.count), 0)).where(
                    stat_counters.c.event_type == "message.clicked"
                )
            ).scalar_one()
        )


def test_tampered_click_token_is_404_without_redirect(tracked: Tracked) -> None:
    good = tracked.token("click", "https://shop.test/")
    forged = tokens.encode(Token("click", tracked.delivery_id, "https://evil.test/"), b"x" * 32)
    for token in (forged, good[:-2] + ("AA" if not good.endswith("AA") else "BB"), "nonsense"):
        response = tracked.get(f"/t/c/{token}")
        assert response.status_code == 404 and "location" not in response.headers
    opened = tracked.get(f"/t/c/{tracked.token('open')}")  # an open token is no click token
    assert opened.status_code == 404
    assert tracked.events("message.clicked") == []


def test_head_is_a_link_check_not_a_click(tracked: Tracked) -> None:
    response = tracked.client.head(
        f"/t/c/{tracked.token('click', 'https://shop.test/')}", follow_redirects=False
    )
    assert response.status_code == 302
    assert tracked.events("message.clicked") == []


def test_non_ascii_urls_are_percent_encoded(tracked: Tracked) -> None:
    response = tracked.get(f"/t/c/{tracked.token('click', 'https://bücher.test/straße?q=café')}")
    assert response.headers["location"] == "https://xn--bcher-kva.test/stra%C3%9Fe?q=caf%C3%A9"


def test_open_pixel_and_first_open(tracked: Tracked) -> None:
    token = tracked.token("open")
    apple = tracked.get(f"/t/o/{token}", user_agent="Mozilla/5.0")
    assert apple.content == PIXEL and apple.headers["content-type"] == "image/gif"
    assert "no-store" in apple.headers["cache-control"] and apple.headers["pragma"] == "no-cache"
    tracked.get(f"/t/o/{token}")
    tracked.get(f"/t/o/{token}")
    opens = tracked.events("message.opened")
    assert [(e["data"]["bot"], e["data"]["first"]) for e in opens] == [
        (True, False),  # Apple's proxy: not a person, so not the first open
        (False, True),
        (False, False),
    ]
    assert opens[0]["data"]["bot_reason"] == "apple_mail_privacy_protection"
    with tracked.store.read() as conn:
        counter = conn.execute(
            select(stat_counters).where(stat_counters.c.event_type == "message.opened")
        ).one()
    assert (counter.count, counter.bot_count) == (3, 1)


def test_forged_open_still_gets_the_pixel_but_no_event(tracked: Tracked) -> None:
    response = tracked.get("/t/o/forged")
    assert response.status_code == 200 and response.content == PIXEL
    assert tracked.events("message.opened") == []


def test_scanner_click_is_a_bot(tracked: Tracked) -> None:
    tracked.get(
        f"/t/c/{tracked.token('click', 'https://shop.test/')}",
        user_agent="Mozilla/5.0 (compatible; Barracuda Sentinel)",
    )
    (event,) = tracked.events("message.clicked")
    assert event["data"]["bot"] is True and event["data"]["bot_reason"] == "barracuda"


def test_click_right_after_delivery_is_a_bot(tracked: Tracked) -> None:
    tracked.delivered(ago=1)
    tracked.get(f"/t/c/{tracked.token('click', 'https://shop.test/')}")
    (event,) = tracked.events("message.clicked")
    assert event["data"]["bot_reason"] == "too_soon_after_delivery"


def test_every_link_clicked_at_once_is_a_bot(tracked: Tracked) -> None:
    for i in range(3):
        tracked.get(f"/t/c/{tracked.token('click', f'https://shop.test/{i}', i, 3)}")
    clicks = tracked.events("message.clicked")
    assert [e["data"]["bot_reason"] for e in clicks] == [None, None, "all_links_clicked"]


def test_unsubscribe_one_click(tracked: Tracked) -> None:
    with tracked.store.write() as conn:
        conn.execute(update(messages).values(stream="broadcast"))
    token = tracked.token("unsubscribe")
    page = tracked.get(f"/t/u/{token}")
    assert page.status_code == 200 and 'method="post"' in page.text
    assert tracked.events("message.unsubscribed") == []  # a GET never unsubscribes
    for _ in range(2):
        done = tracked.client.post(
            f"/t/u/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert done.status_code == 200
    (event,) = tracked.events("message.unsubscribed")  # once, however often it is posted
    # an opt-out keeps what it needs: no IP address, no user agent
    assert event["data"] == {"source": "one-click"}
    with tracked.store.read() as conn:
        listed = conn.execute(select(suppressions)).mappings().one()
    assert (listed["email"], listed["stream"], listed["reason"], listed["source"]) == (
        "alice@dest.test",
        "broadcast",
        "unsubscribed",
        "unsubscribe",
    )


def test_unsubscribe_refuses_forged_tokens(tracked: Tracked) -> None:
    click = tracked.token("click", "https://shop.test/")
    assert tracked.get(f"/t/u/{click}").status_code == 404
    assert tracked.client.post(f"/t/u/{click}").status_code == 404
    with tracked.store.read() as conn:
        assert conn.execute(select(suppressions)).first() is None


def test_fast_path_answers_the_same(settings: Settings, store: Store) -> None:
    app = create_app(settings, store)
    with TestClient(fast_path(app), client=("2001:db8:1:2:3::9", 1)) as client:
        tracked = Tracked(client, store, tracking_key(settings, store), app)
        click = tracked.get(f"/t/c/{tracked.token('click', 'https://shop.test/x')}")
        assert click.status_code == 302 and click.headers["location"] == "https://shop.test/x"
        assert tracked.get("/t/c/forged").status_code == 404
        assert tracked.get(f"/t/o/{tracked.token('open')}").content == PIXEL
        assert tracked.get("/t/c/a/b").status_code == 404  # not a token: FastAPI's 404
        assert client.get("/healthz").json()["status"] == "ok"  # the rest is FastAPI's
        (event,) = tracked.events("message.clicked")
        assert event["data"]["ip"] == "2001:db8:1::"
        assert len(tracked.events("message.opened")) == 1
