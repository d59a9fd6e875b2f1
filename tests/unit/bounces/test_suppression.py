"""The suppression list: entries that only ever strengthen, expiry, keyset pages, CSV."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.bounces import suppression
from postbode.bounces.suppression import (
    Entry,
    SuppressionError,
    is_suppressed,
    make_entry,
    page,
    read_csv,
    suppress,
    suppress_many,
    unsuppress,
)
from postbode.store.engine import Store
from postbode.store.schema import suppressions, utcnow


@pytest.fixture
def app_id(store: Store) -> int:
    return tenancy.create_app(store, "shop").app_id


def entry(store: Store, app_id: int, email: str, stream: str = "all") -> dict[str, object]:
    with store.read() as conn:
        row = (
            conn.execute(
                select(suppressions).where(
                    suppressions.c.app_id == app_id,
                    suppressions.c.email == email,
                    suppressions.c.stream == stream,
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


def test_a_permanent_entry_is_never_weakened(store: Store, app_id: int) -> None:
    with store.write() as conn:
        assert suppress(conn, app_id, "Bob@Dest.test", reason="user_unknown", source="bounce")
        later = utcnow() + timedelta(days=3)
        assert not suppress(
            conn, app_id, "bob@dest.test", reason="mailbox_full", source="bounce", expires_at=later
        )
        assert not suppress(conn, app_id, "bob@dest.test", reason="manual", source="manual")
    row = entry(store, app_id, "bob@dest.test")
    assert (row["reason"], row["source"], row["expires_at"]) == ("user_unknown", "bounce", None)


def test_an_expired_entry_gives_way_to_a_new_one(store: Store, app_id: int) -> None:
    past = utcnow() - timedelta(days=1)
    with store.write() as conn:
        suppress(
            conn, app_id, "bob@dest.test", reason="mailbox_full", source="bounce", expires_at=past
        )
        assert not is_suppressed(conn, app_id, "bob@dest.test", "transactional")
        # A hard bounce after a soft suppression ran out must suppress for good.
        assert suppress(conn, app_id, "bob@dest.test", reason="user_unknown", source="bounce")
        assert is_suppressed(conn, app_id, "bob@dest.test", "transactional")
    row = entry(store, app_id, "bob@dest.test")
    assert (row["reason"], row["expires_at"]) == ("user_unknown", None)


def test_a_longer_expiry_extends_a_shorter_one(store: Store, app_id: int) -> None:
    soon, later = utcnow() + timedelta(days=1), utcnow() + timedelta(days=9)
    with store.write() as conn:
        suppress(
            conn, app_id, "a@dest.test", reason="mailbox_full", source="bounce", expires_at=later
        )
        assert not suppress(
            conn, app_id, "a@dest.test", reason="mailbox_full", source="bounce", expires_at=soon
        )
    assert entry(store, app_id, "a@dest.test")["expires_at"] == later


def test_stream_entries_apply_to_their_stream_and_all_to_every_stream(
    store: Store, app_id: int
) -> None:
    with store.write() as conn:
        suppress(
            conn,
            app_id,
            "news@dest.test",
            reason="complaint",
            source="complaint",
            stream="broadcast",
        )
        suppress(conn, app_id, "gone@dest.test", reason="user_unknown", source="bounce")
        assert is_suppressed(conn, app_id, "news@dest.test", "broadcast")
        assert not is_suppressed(conn, app_id, "news@dest.test", "transactional")
        assert is_suppressed(conn, app_id, "gone@dest.test", "broadcast")
        assert is_suppressed(conn, app_id, "GONE@dest.test", "transactional")


def test_pages_follow_the_keyset_and_leave_out_expired_and_other_apps(
    store: Store, app_id: int
) -> None:
    other = tenancy.create_app(store, "other").app_id
    with store.write() as conn:
        n = suppress_many(
            conn, app_id, [Entry(f"u{i}@dest.test") for i in range(7)], source="manual"
        )
        suppress(
            conn,
            app_id,
            "old@dest.test",
            reason="mailbox_full",
            source="bounce",
            expires_at=utcnow() - timedelta(seconds=1),
        )
        suppress(conn, other, "u0@dest.test", reason="manual", source="manual")
    assert n == 7
    seen: list[str] = []
    after = None
    with store.read() as conn:
        while True:
            rows, after = page(conn, app_id, after=after, limit=3)
            seen += [str(r["email"]) for r in rows]
            if after is None:
                break
    assert seen == [f"u{i}@dest.test" for i in range(7)]


def test_suppress_many_counts_only_what_changed(store: Store, app_id: int) -> None:
    with store.write() as conn:
        assert (
            suppress_many(
                conn, app_id, [Entry("a@dest.test"), Entry("a@dest.test")], source="manual"
            )
            == 1
        )
        assert (
            suppress_many(
                conn, app_id, [Entry("a@dest.test"), Entry("b@dest.test")], source="manual"
            )
            == 1
        )
        assert unsuppress(conn, app_id, "A@dest.test") == 1
        assert unsuppress(conn, app_id, "a@dest.test") == 0


def test_entries_are_checked_field_by_field() -> None:
    assert make_entry(" <Bob@Dest.TEST> ") == Entry("bob@dest.test", "manual", "all", None)
    for email in ("bob", "bob@", "a b@dest.test", "a@dest", "x" * 65 + "@dest.test"):
        with pytest.raises(SuppressionError) as exc:
            make_entry(email)
        assert exc.value.field == "email"
    with pytest.raises(SuppressionError) as exc:
        make_entry("a@dest.test", stream="marketing")
    assert exc.value.field == "stream"
    with pytest.raises(SuppressionError) as exc:
        make_entry("a@dest.test", reason="Because I said so")
    assert exc.value.field == "reason"
    with pytest.raises(SuppressionError) as exc:
        make_entry("a@dest.test", expires_at="next tuesday")
    assert exc.value.field == "expires_at"
    assert make_entry("a@dest.test", expires_at="2030-01-02T03:04:05").expires_at == datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=UTC
    )


def test_csv_rows_are_read_with_their_line_numbers() -> None:
    text = (
        "\ufeffEmail,Reason,Stream,note\r\n"
        "alice@dest.test,manual,all,first\r\n"
        "\r\n"
        "not-an-address,manual,all,bad\r\n"
        'bob@dest.test,"complaint",broadcast,"two\r\nlines"\r\n'
        "carol@dest.test,,transactional\r\n"
        "dave@dest.test,manual,newsletter,bad stream\r\n"
        "erin@dest.test\r\n"
    )
    entries, errors = read_csv(text)
    assert entries == [
        Entry("alice@dest.test", "manual", "all"),
        Entry("bob@dest.test", "complaint", "broadcast"),
        Entry("carol@dest.test", "manual", "transactional"),
        Entry("erin@dest.test", "manual", "all"),
    ]
    assert [(e.line, e.field) for e in errors] == [(4, "email"), (8, "stream")]


def test_a_csv_without_an_email_column_is_refused_whole() -> None:
    with pytest.raises(SuppressionError):
        read_csv("address,reason\na@dest.test,manual\n")
    with pytest.raises(SuppressionError):
        read_csv("")


def test_a_broken_quote_stops_the_import_with_its_line() -> None:
    entries, errors = read_csv('email\na@dest.test\n"b@dest.test\n', max_rows=10)
    assert entries == [Entry("a@dest.test")]
    assert errors and errors[0].line == 3


def test_csv_rows_beyond_the_cap_are_reported() -> None:
    entries, errors = read_csv("email\n" + "".join(f"u{i}@d.test\n" for i in range(5)), max_rows=3)
    assert len(entries) == 3 and errors[0].line == 5 and "more than 3 rows" in errors[0].message


def test_exported_rows_read_back_as_the_same_entries() -> None:
    until = datetime(2031, 1, 1, 12, 30, tzinfo=UTC)
    rows = [
        {
            "email": "a@dest.test",
            "reason": "user_unknown",
            "stream": "all",
            "source": "bounce",
            "created_at": utcnow(),
            "expires_at": None,
        },
        {
            "email": "o'hara@dest.test",
            "reason": "mailbox_full",
            "stream": "broadcast",
            "source": "bounce",
            "created_at": utcnow(),
            "expires_at": until,
        },
    ]
    text = suppression.csv_header() + "".join(suppression.csv_row(r) for r in rows)
    assert text.startswith("email,reason,stream,source,created_at,expires_at\r\n")
    assert read_csv(text) == (
        [
            Entry("a@dest.test", "user_unknown", "all", None),
            Entry("o'hara@dest.test", "mailbox_full", "broadcast", until),
        ],
        [],
    )


def test_expired_entries_are_not_in_force(store: Store, app_id: int) -> None:
    with store.write() as conn:
        suppress(
            conn,
            app_id,
            "a@dest.test",
            reason="mailbox_full",
            source="bounce",
            expires_at=utcnow() + timedelta(days=1),
        )
        assert is_suppressed(conn, app_id, "a@dest.test", "broadcast")
        conn.execute(update(suppressions).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert not is_suppressed(conn, app_id, "a@dest.test", "broadcast")
        assert page(conn, app_id) == ([], None)


def test_csv_export_guards_formulas_and_import_reads_them_back() -> None:
    from postbode.bounces.suppression import csv_row, read_csv

    row = csv_row({"email": "=cmd@x.test", "reason": "manual", "stream": "all"})
    assert "'=cmd@x.test" in row
    entries, errors = read_csv("email,reason,stream\r\n" + row)
    assert not errors and entries[0].email == "=cmd@x.test"
