"""BulkInsert writes what `insert(table)` through SQLAlchemy writes, on both dialects."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select

from postbode import tenancy
from postbode.store.bulk import BulkInsert
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages, new_id, utcnow


def _message(app_id: int, **values: Any) -> dict[str, Any]:
    return {
        "id": new_id(),
        "app_id": app_id,
        "source": "api",
        "message_id_header": "<a@shop.test>",
        "mail_from": "orders@shop.test",
        "size": 10,
        **values,
    }


def test_rows_read_back_as_through_sqlalchemy(store: Store) -> None:
    app_id = tenancy.create_app(store, "shop").app_id
    now = utcnow()
    full = {
        "stream": "broadcast",
        "tag": "welcome",
        "metadata": {"order": "42", "ü": "ß"},
        "from_header": "Shop <orders@shop.test>",
        "subject": "Hi",
        "domain_verified": True,
        "track_opens": True,
        "track_clicks": False,
        "received_at": now,
    }
    # one row with every value given, one leaving the columns with defaults to them
    ours = [_message(app_id, **full), _message(app_id)]
    theirs = [_message(app_id, **full), _message(app_id)]
    with store.write() as conn:
        for mine, reference in zip(ours, theirs, strict=True):  # each shape on its own
            BulkInsert.execute(conn, BulkInsert(messages).prepare(conn.dialect, [mine]))
            conn.execute(insert(messages), [reference])
        read = {r.id: r._asdict() for r in conn.execute(select(messages))}
    for mine, reference in zip(ours, theirs, strict=True):
        got, expected = dict(read[mine["id"]]), dict(read[reference["id"]])
        del got["id"], expected["id"]
        if mine is ours[1]:  # defaults made per row: received_at is "now" for each
            assert abs(got.pop("received_at") - expected.pop("received_at")).total_seconds() < 5
        assert got == expected
    assert read[ours[0]["id"]]["metadata"] == {"order": "42", "ü": "ß"}
    assert read[ours[0]["id"]]["received_at"] == now


def test_uuid_foreign_keys_and_no_rows(store: Store) -> None:
    app_id = tenancy.create_app(store, "shop").app_id
    message = _message(app_id)
    delivery = {
        "id": new_id(),
        "message_id": message["id"],
        "app_id": app_id,
        "recipient": "a@dest.test",
        "recipient_domain": "dest.test",
        "verp_token": "t1",
        "status": "queued",
    }
    with store.write() as conn:
        BulkInsert.execute(conn, BulkInsert(messages).prepare(conn.dialect, [message]))
        BulkInsert.execute(conn, BulkInsert(deliveries).prepare(conn.dialect, [delivery]))
        BulkInsert.execute(conn, BulkInsert(deliveries).prepare(conn.dialect, []))
        row = conn.execute(select(deliveries)).one()
    assert (row.id, row.message_id, row.status, row.attempts) == (  # attempts: its default
        delivery["id"],
        message["id"],
        "queued",
        0,
    )
