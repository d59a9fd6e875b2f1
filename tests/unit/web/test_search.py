"""The message log's search on both dialects: every filter, keyset pages, bounded scans, CSV."""

from __future__ import annotations

import csv
import io
import secrets
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages, new_id, raw_messages
from postbode.web.ui import search
from postbode.web.ui.search import Cursor, MessageQuery, SearchError

from .conftest import PASSWORD, Browser

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


_made = iter(range(1, 1 << 40))


def id_at(at: datetime) -> Any:
    """A message id as acceptance makes it: a UUIDv7 of the instant it was received at (ids
    made later within one millisecond are larger, as store.schema.new_id makes them)."""
    value = (int(at.timestamp() * 1000) << 80) | next(_made) << 8
    value = value & ~(0xF << 76) | 0x7 << 76
    value = value & ~(0x3 << 62) | 0x2 << 62
    return uuid.UUID(int=value)


def put_message(
    store: Store,
    app_id: int,
    *,
    subject: str = "Hello",
    recipients: list[tuple[str, str]] = (("alice@dest.test", "delivered"),),  # type: ignore[assignment]
    at: datetime = T0,
    tag: str | None = None,
    metadata: dict[str, str] | None = None,
    mail_from: str = "orders@shop.test",
    from_header: str = "Shop <orders@shop.test>",
    message_id: str | None = None,
) -> Any:
    ident = id_at(at)
    with store.write() as conn:
        conn.execute(
            insert(messages).values(
                id=ident,
                app_id=app_id,
                source="api",
                message_id_header=message_id or f"<{ident}@shop.test>",
                mail_from=mail_from,
                from_header=from_header,
                subject=subject,
                tag=tag,
                metadata=metadata or {},
                size=100,
                received_at=at,
            )
        )
        conn.execute(insert(raw_messages).values(message_id=ident, data=zlib.compress(b"x")))
        conn.execute(
            insert(deliveries),
            [
                {
                    "id": new_id(),
                    "message_id": ident,
                    "app_id": app_id,
                    "recipient": email,
                    "recipient_domain": email.rsplit("@", 1)[1],
                    "status": status,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "first_queued_at": at,
                    "verp_token": secrets.token_hex(12),
                }
                for email, status in recipients
            ],
        )
    return ident


def ids(store: Store, q: MessageQuery, **kwargs: Any) -> list[Any]:
    with store.read() as conn:
        return [r["id"] for r in search.search(conn, q, **kwargs).rows]


@pytest.fixture
def shop(store: Store) -> int:
    return tenancy.create_app(store, "shop").app_id


def test_every_filter(store: Store, shop: int) -> None:
    other_app = tenancy.create_app(store, "other").app_id
    a = put_message(
        store,
        shop,
        subject="Your order 42 has shipped",
        tag="order-shipped",
        metadata={"customer": "c-1"},
        at=T0,
    )
    b = put_message(
        store,
        shop,
        subject="Reset your password",
        tag="password-reset",
        recipients=[("Bob@dest.test", "bounced"), ("carol@else.test", "delivered")],
        mail_from="noreply@shop.test",
        from_header="Shop Security <noreply@shop.test>",
        at=T0 + timedelta(minutes=1),
        message_id="<reset-1@shop.test>",
    )
    c = put_message(
        store,
        shop,
        subject="100% off_today",
        recipients=[("dan@dest.test", "deferred")],
        at=T0 + timedelta(minutes=2),
        metadata={"customer": "c-2"},
    )
    elsewhere = put_message(store, other_app, subject="Your order 42 has shipped", at=T0)
    mine = (shop,)
    assert ids(store, MessageQuery(mine)) == [c, b, a]
    # Received at the same instant: the later id first.
    assert ids(store, MessageQuery((shop, other_app))) == [c, b, elsewhere, a]
    assert ids(store, MessageQuery(mine, tag="password-reset")) == [b]
    # A whole address (index), in any case.
    assert ids(store, MessageQuery(mine, recipient="Bob@DEST.test")) == [b]
    assert ids(store, MessageQuery(mine, recipient="bob@dest.test")) == [b]
    assert ids(store, MessageQuery(mine, recipient="Carol@Else.Test")) == [b]
    assert ids(store, MessageQuery(mine, recipient="dest.test")) == [c, b, a]  # part of addresses
    assert ids(store, MessageQuery(mine, recipient="@else")) == [b]
    assert ids(store, MessageQuery(mine, sender="noreply")) == [b]
    assert ids(store, MessageQuery(mine, sender="Security")) == [b]
    assert ids(store, MessageQuery(mine, subject="ORDER")) == [a]
    assert ids(store, MessageQuery(mine, subject="100%")) == [c]  # LIKE wildcards are literal
    assert ids(store, MessageQuery(mine, subject="o_f")) == []  # "_" would match "off"
    assert ids(store, MessageQuery(mine, status="bounced")) == [b]
    assert ids(store, MessageQuery(mine, status="delivered")) == [b, a]
    assert ids(store, MessageQuery(mine, message_id="reset-1@shop.test")) == [b]
    assert ids(store, MessageQuery(mine, message_id="<reset-1@shop.test>")) == [b]
    assert ids(store, MessageQuery(mine, metadata=("customer", "c-2"))) == [c]
    assert ids(store, MessageQuery(mine, since=T0 + timedelta(minutes=1))) == [c, b]
    assert ids(store, MessageQuery(mine, until=T0 + timedelta(minutes=1))) == [a]
    both = MessageQuery(mine, recipient="carol@else.test", status="delivered", tag="password-reset")
    assert ids(store, both) == [b]
    assert ids(store, MessageQuery((), subject="x")) == []


def test_keyset_pages_follow_time_then_id(store: Store, shop: int) -> None:
    # Same received_at for several messages: the id breaks the tie, no row is seen twice.
    made = [put_message(store, shop, at=T0 + timedelta(seconds=i // 3)) for i in range(10)]
    expected = list(reversed(made))
    seen: list[Any] = []
    cursor = None
    while True:
        with store.read() as conn:
            page = search.search(conn, MessageQuery((shop,)), cursor=cursor, limit=4)
        seen += [r["id"] for r in page.rows]
        if page.next_cursor is None:
            break
        cursor = Cursor.decode(page.next_cursor.encode())
    assert seen == expected


def test_a_scan_is_bounded_and_says_where_it_stopped(store: Store, shop: int) -> None:
    for i in range(7):
        put_message(store, shop, subject="noise", at=T0 + timedelta(minutes=i))
    needle = put_message(store, shop, subject="needle", at=T0 - timedelta(minutes=1))
    q = MessageQuery((shop,), subject="needle")
    with store.read() as conn:
        first = search.search(conn, q, limit=2, window=5)
        assert first.rows == [] and first.scanned_back_to == T0 + timedelta(minutes=2)
        assert first.next_cursor is not None
        second = search.search(conn, q, cursor=first.next_cursor, limit=2, window=5)
    assert [r["id"] for r in second.rows] == [needle] and second.scanned_back_to is None
    assert second.next_cursor is None
    # The export goes on through every window.
    assert [r["id"] for r in search.iterate(store, q, chunk=2)] == [needle]


def test_bad_filters_name_their_field() -> None:
    with pytest.raises(SearchError) as bad:
        search.check(MessageQuery((1,), status="exploded"))
    assert bad.value.field == "status"
    with pytest.raises(SearchError) as bad:
        search.parse_metadata("no equals sign")
    assert bad.value.field == "metadata"
    assert search.parse_metadata(" order.id = 42 ") == ("order.id", "42")
    with pytest.raises(SearchError):
        Cursor.decode("not-a-cursor")


def test_csv_cells_never_become_formulas() -> None:
    assert search.csv_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert search.csv_cell("+1") == "'+1" and search.csv_cell("-1") == "'-1"
    assert search.csv_cell("@SUM(A1)") == "'@SUM(A1)" and search.csv_cell("plain") == "plain"


def test_the_log_page_and_its_export(
    store: Store, shop: int, make_ui: Callable[[Store], tuple[Any, Callable[[], Browser]]]
) -> None:
    tenancy.create_user(store, "owner@org.test", PASSWORD, admin=True)
    now = datetime.now(UTC)
    old = put_message(store, shop, subject="Older", at=now - timedelta(days=3), tag="weekly")
    new = put_message(
        store,
        shop,
        subject="=cmd|' /C calc'!A0",
        at=now - timedelta(minutes=5),
        tag="weekly",
        recipients=[("eve@dest.test", "deferred")],
    )
    _, browser = make_ui(store)
    b = browser()
    b.login("owner@org.test")
    page = b.get("/messages?range=24h&tag=weekly")
    assert str(new) in page.text and str(old) not in page.text
    assert 'option value="24h" selected' in page.text
    export = b.get("/messages/export.csv?tag=weekly")
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"].startswith('attachment; filename="messages-')
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["id"] for r in rows] == [str(new), str(old)]
    assert rows[0]["subject"] == "'=cmd|' /C calc'!A0"
    assert rows[0]["recipients"] == "eve@dest.test" and rows[0]["statuses"] == "deferred"
    assert b.get("/messages?status=exploded").status_code == 400
    assert b.get("/messages?since=yesterday").status_code == 400
    assert b.get("/messages?cursor=zzz").status_code == 400


def test_several_apps_merge_and_a_stopped_scan_cuts_the_page(store: Store, shop: int) -> None:
    other = tenancy.create_app(store, "other").app_id
    # shop: busy and noisy; other: quiet, with matches at every age.
    for i in range(8):
        put_message(store, shop, subject="noise", at=T0 + timedelta(minutes=10 + i))
    old_shop = put_message(store, shop, subject="match", at=T0)
    recent = put_message(store, other, subject="match", at=T0 + timedelta(minutes=15))
    older = put_message(store, other, subject="match", at=T0 + timedelta(minutes=5))
    q = MessageQuery((shop, other), subject="match")
    with store.read() as conn:
        first = search.search(conn, q, limit=10, window=4)
        # shop's scan stopped at minute 14: other's match at minute 5 must wait, or a shop
        # match between minutes 5 and 14 could be skipped.
        assert [r["id"] for r in first.rows] == [recent]
        assert first.scanned_back_to == T0 + timedelta(minutes=14)
        second = search.search(conn, q, cursor=first.next_cursor, limit=10, window=4)
        assert [r["id"] for r in second.rows] == []
        third = search.search(conn, q, cursor=second.next_cursor, limit=10, window=4)
    assert [r["id"] for r in third.rows] == [older, old_shop] and third.next_cursor is None
    assert [r["id"] for r in search.iterate(store, q, chunk=1)] == [recent, older, old_shop]
    # Without scanned filters the apps' pages merge in time order.
    with store.read() as conn:
        page = search.search(conn, MessageQuery((shop, other)), limit=3)
    assert [r["received_at"] for r in page.rows] == [
        T0 + timedelta(minutes=m) for m in (17, 16, 15)
    ]


def test_a_busy_address_is_found_through_the_time_index(
    store: Store, shop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = [
        put_message(
            store, shop, recipients=[("busy@dest.test", "delivered")], at=T0 + timedelta(minutes=i)
        )
        for i in range(4)
    ]
    put_message(store, shop, recipients=[("quiet@dest.test", "delivered")])
    q = MessageQuery((shop,), recipient="busy@dest.test")
    assert ids(store, q) == list(reversed(made))  # read by id
    monkeypatch.setattr(search, "EXACT_CAP", 2)
    assert ids(store, q) == list(reversed(made))  # more than the cap: by the time index
    assert ids(store, q, limit=3)[:3] == list(reversed(made))[:3]
    both = MessageQuery((shop,), recipient="busy@dest.test", message_id=f"<{made[1]}@shop.test>")
    assert ids(store, both) == [made[1]]
    assert ids(store, MessageQuery((shop,), recipient="nobody@dest.test")) == []


def test_a_busy_address_pages_newest_first_in_id_order(
    store: Store, shop: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More messages than ID_WALK_OVER: walked in message-id order, page after page, in two apps;
    # one message has the address twice (in two cases), others go to someone else.
    other = tenancy.create_app(store, "other").app_id
    made: list[Any] = []
    for i in range(23):
        at = T0 + timedelta(minutes=i // 2)  # pairs share an instant: the id breaks the tie
        app = other if i % 5 == 0 else shop
        to = [("busy@dest.test", "delivered")]
        if i == 9:  # mid-page: a second row for it would show
            to.append(("Busy@DEST.test", "bounced"))
        made.append(put_message(store, app, recipients=to, at=at))
        put_message(store, shop, recipients=[("quiet@dest.test", "delivered")], at=at)
    newest_first = list(reversed(made))
    monkeypatch.setattr(search, "ID_WALK_OVER", 5)
    q = MessageQuery((shop, other), recipient="BUSY@dest.test")
    seen: list[Any] = []
    pages: list[search.Page] = []
    cursor = None
    while True:
        with store.read() as conn:
            page = search.search(conn, q, cursor=cursor, limit=4)
        pages.append(page)
        seen += [r["id"] for r in page.rows]
        if page.next_cursor is None:
            break
        cursor = Cursor.decode(page.next_cursor.encode())
    assert seen == newest_first
    assert len(pages) == 6
    assert [len(r["deliveries"]) for p in pages for r in p.rows if r["id"] == made[9]] == [2]
    with store.read() as conn:
        # Back from the third page: the second page again, then the first.
        back = search.search(conn, q, newer_than=pages[2].newer_cursor, limit=4)
        assert [r["id"] for r in back.rows] == newest_first[4:8]
        assert back.newer_cursor is not None
        top = search.search(conn, q, newer_than=back.newer_cursor, limit=4)
        assert [r["id"] for r in top.rows] == newest_first[:4]
        assert top.newer_cursor is None
        # Jump to a date: the address's messages received before it.
        jumped = search.search(conn, q, cursor=Cursor.at(T0 + timedelta(minutes=5)), limit=3)
        assert [r["id"] for r in jumped.rows] == [made[9], made[8], made[7]]
        # Bounds and a tag still hold on the walk.
        until = MessageQuery((shop,), recipient="busy@dest.test", until=T0 + timedelta(minutes=2))
        assert [r["id"] for r in search.search(conn, until).rows] == [made[3], made[2], made[1]]
        assert search.count_matches(conn, q) == (24, False)  # deliveries: one message has two


def _set_delivery(store: Store, recipient: str, **values: Any) -> None:
    from sqlalchemy import update

    with store.write() as conn:
        conn.execute(update(deliveries).where(deliveries.c.recipient == recipient).values(**values))


def test_delivery_filters_hold_for_one_delivery_and_rows_are_deliveries(
    store: Store, shop: int
) -> None:
    mixed = put_message(
        store,
        shop,
        subject="Mixed",
        recipients=[
            ("ann@dest.test", "delivered"),
            ("bob@dest.test", "bounced"),
            ("cy@grey.test", "deferred"),
        ],
    )
    _set_delivery(store, "ann@dest.test", last_reply="250 2.0.0 OK", mx="mx1.dest.test")
    _set_delivery(
        store,
        "bob@dest.test",
        last_reply="550 5.1.1 No such user",
        bounce_category="user_unknown",
        mx="mx1.dest.test",
    )
    _set_delivery(store, "cy@grey.test", last_reply="451 4.7.1 Greylisted", mx="mx.grey.test")

    def rows(**filters: Any) -> list[str]:
        q = MessageQuery((shop,), **filters)
        with store.read() as conn:
            page = search.search(conn, q)
        return [d["email"] for m in page.rows for d in m["deliveries"]]

    assert rows() == ["ann@dest.test", "bob@dest.test", "cy@grey.test"]
    assert rows(reply="greylisted") == ["cy@grey.test"]
    assert rows(category="user_unknown") == ["bob@dest.test"]
    assert rows(mx="MX1.dest.test") == ["ann@dest.test", "bob@dest.test"]
    assert rows(mx="mx1.dest.test", status="bounced") == ["bob@dest.test"]
    assert rows(recipient="ann@dest.test", reply="5.1.1") == []  # not the same delivery
    assert rows(recipient="bob@dest.test", reply="5.1.1") == ["bob@dest.test"]
    with pytest.raises(SearchError) as info:
        rows(category="exploded")
    assert info.value.field == "category"
    with store.read() as conn:
        assert search.count_matches(conn, MessageQuery((shop,))) == (3, False)
        assert search.count_matches(conn, MessageQuery((shop,), mx="mx1")) == (2, False)
        # Beyond the bound, the count says "more than".
        assert search.count_matches(conn, MessageQuery((shop,)), bound=2) == (3, False)
    with store.read() as conn:
        row = search.search(conn, MessageQuery((shop,), category="user_unknown"))
    csv_rows = list(search.csv_rows(row.rows[0]))
    assert len(csv_rows) == 1
    found = dict(zip(search.CSV_COLUMNS, csv_rows[0], strict=True))
    assert found["id"] == str(mixed) and found["recipient"] == "bob@dest.test"
    assert found["bounce_category"] == "user_unknown"
    assert found["last_reply"] == "550 5.1.1 No such user"


def test_newer_and_older_pages_and_a_jump_to_a_date(store: Store, shop: int) -> None:
    made = [
        put_message(store, shop, subject=f"m{i}", at=T0 + timedelta(minutes=i)) for i in range(7)
    ]
    newest_first = list(reversed(made))
    for q in (MessageQuery((shop,)), MessageQuery((shop,), subject="m")):  # indexed, scanned
        with store.read() as conn:
            first = search.search(conn, q, limit=3, window=4)
            assert [r["id"] for r in first.rows] == newest_first[:3]
            assert first.newer_cursor is None
            second = search.search(conn, q, cursor=first.next_cursor, limit=3, window=4)
            assert [r["id"] for r in second.rows] == newest_first[3:6]
            assert second.newer_cursor is not None
            back = search.search(conn, q, newer_than=second.newer_cursor, limit=3, window=4)
            assert [r["id"] for r in back.rows] == newest_first[:3]
            assert back.newer_cursor is None
            # Jump to 12:04: the page of messages received before it.
            jumped = search.search(
                conn, q, cursor=Cursor.at(T0 + timedelta(minutes=4)), limit=3, window=4
            )
            assert [r["id"] for r in jumped.rows] == [made[3], made[2], made[1]]
            assert jumped.newer_cursor is not None


def test_a_count_with_scanned_filters_looks_at_the_newest_window(store: Store, shop: int) -> None:
    for i in range(5):
        put_message(store, shop, subject=f"match {i}", at=T0 + timedelta(minutes=i))
    with store.read() as conn:
        assert search.count_matches(conn, MessageQuery((shop,), subject="match")) == (5, False)
        # Only the newest 3 messages are looked at: 3 match, and the count says so.
        limited = search.count_matches(conn, MessageQuery((shop,), subject="match"), window=3)
        assert limited == (3, True)
        # An indexed filter counts everything.
        assert search.count_matches(conn, MessageQuery((shop,)), window=3) == (5, False)


def test_a_rare_state_is_found_beyond_the_scan_window_through_its_index(
    store: Store, shop: int
) -> None:
    for i in range(7):
        put_message(store, shop, subject="noise", at=T0 + timedelta(minutes=i))
    old = put_message(
        store,
        shop,
        recipients=[("a@dest.test", "delivered"), ("b@dest.test", "deferred")],
        at=T0 - timedelta(days=1),
    )
    put_message(store, shop, recipients=[("c@dest.test", "deferred")], at=T0, tag="other")
    q = MessageQuery((shop,), status="deferred")
    with store.read() as conn:
        page = search.search(conn, q, limit=2, window=5)
        assert len(page.rows) == 2 and page.rows[1]["id"] == old
        assert page.scanned_back_to is None and page.next_cursor is None
        # Counted exactly (deliveries, not messages), not "among the newest 5".
        assert search.count_matches(conn, q, window=5) == (2, False)
        both = MessageQuery((shop,), status="deferred", recipient="B@dest.test")
        assert [r["id"] for r in search.search(conn, both, window=5).rows] == [old]
        assert search.count_matches(conn, both, window=5) == (1, False)
        # The state must be that of the delivery that matched the other filters.
        wrong = MessageQuery((shop,), status="deferred", recipient="a@dest.test")
        assert search.search(conn, wrong, window=5).rows == []
        assert search.count_matches(conn, wrong, window=5) == (0, False)
    # The common state is still found among the newest messages.
    with store.read() as conn:
        delivered = search.search(conn, MessageQuery((shop,), status="delivered"), limit=3)
    assert len(delivered.rows) == 3


def _every_page(store: Store, q: MessageQuery, *, limit: int, window: int) -> list[Any]:
    """Every match, page after page (through every window), as the log's "older" links go."""
    seen: list[Any] = []
    cursor = None
    for _ in range(1000):
        with store.read() as conn:
            page = search.search(conn, q, cursor=cursor, limit=limit, window=window)
        seen += [r["id"] for r in page.rows]
        if page.next_cursor is None:
            return seen
        cursor = Cursor.decode(page.next_cursor.encode())
    raise AssertionError("the pages never ended")


def test_state_category_and_reply_walks_find_exactly_the_matches(store: Store, shop: int) -> None:
    """The filters walked on the deliveries (a state's or a category's index, or the window's
    deliveries) list every matching message once, newest first, page after page, and count
    every matching delivery: the same as reading every message."""
    import random

    from sqlalchemy import update

    other = tenancy.create_app(store, "other").app_id
    rng = random.Random(7)
    kinds = [
        ("delivered", None, "250 2.0.0 OK queued as {n}"),
        ("bounced", "user_unknown", "550 5.1.1 <{n}>: no such user"),
        ("bounced", "blocked", "554 5.7.1 blocked using zen.spamhaus.test"),
        ("deferred", None, "451 4.7.1 greylisted, try again"),
        ("failed", "expired", "451 4.4.1 timed out"),
    ]
    made: list[tuple[Any, int, datetime, str | None, list[tuple[str, str | None, str]]]] = []
    for i in range(90):
        app = other if i % 4 == 0 else shop
        at = T0 + timedelta(minutes=i // 2)  # pairs share an instant
        tag = rng.choice([None, "welcome", "invoice"])
        picked = [rng.choices(kinds, weights=[6, 2, 1, 1, 1])[0] for _ in range(rng.randint(1, 3))]
        to = [(f"r{i}-{k}@dest.test", status) for k, (status, _, _) in enumerate(picked)]
        ident = put_message(store, app, recipients=to, at=at, tag=tag)
        details = []
        for k, (status, category, reply) in enumerate(picked):
            _set_delivery(
                store, f"r{i}-{k}@dest.test", bounce_category=category, last_reply=reply.format(n=i)
            )
            details.append((status, category, reply.format(n=i)))
        made.append((ident, app, at, tag, details))

    def expected(q: MessageQuery) -> tuple[list[Any], int]:
        def hit(status: str, category: str | None, reply: str) -> bool:
            return (
                (q.status is None or status == q.status)
                and (q.category is None or category == q.category)
                and (q.reply is None or q.reply.lower() in reply.lower())
            )

        rows = [
            (at, ident, sum(hit(*d) for d in details))
            for ident, app, at, tag, details in made
            if app in q.app_ids
            and (q.tag is None or tag == q.tag)
            and (q.since is None or at >= q.since)
            and (q.until is None or at < q.until)
        ]
        rows = [r for r in rows if r[2]]
        rows.sort(reverse=True)
        return [ident for _, ident, _ in rows], sum(n for _, _, n in rows)

    both = (shop, other)
    queries = [
        MessageQuery(both, status="bounced"),
        MessageQuery((shop,), status="deferred"),
        MessageQuery(both, status="failed"),
        MessageQuery(both, category="user_unknown"),
        MessageQuery(both, category="blocked", status="bounced"),
        MessageQuery(both, status="bounced", tag="welcome"),
        MessageQuery(both, category="user_unknown", reply="no such"),
        MessageQuery(both, reply="SPAMHAUS"),
        MessageQuery(both, reply="greylisted", since=T0 + timedelta(minutes=10)),
        MessageQuery(
            both,
            status="bounced",
            since=T0 + timedelta(minutes=5),
            until=T0 + timedelta(minutes=30),
        ),
        MessageQuery(both, status="delivered", reply="queued"),
    ]
    for q in queries:
        want, deliveries_matching = expected(q)
        assert want, q  # each query finds something
        for limit, window in ((4, 7), (5, 1000), (100, 3)):
            assert _every_page(store, q, limit=limit, window=window) == want, (q, limit, window)
        with store.read() as conn:
            assert search.count_matches(conn, q, window=1000) == (deliveries_matching, False), q
            count, limited = search.count_matches(conn, q, bound=1000, window=7)
        assert count <= deliveries_matching and (limited or count == deliveries_matching), q
    # A delivery changing state leaves the state's walk at once.
    first_bounced = expected(MessageQuery(both, status="bounced"))[0][0]
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.message_id == first_bounced)
            .values(status="delivered")
        )
    assert first_bounced not in _every_page(
        store, MessageQuery(both, status="bounced"), limit=5, window=1000
    )
