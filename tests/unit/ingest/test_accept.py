"""The front door: what a stored message looks like, suppression at accept, group commit."""

from __future__ import annotations

import asyncio
import email
import email.utils
import zlib
from collections import Counter

import pytest
from sqlalchemy import insert, select

from postbode import tenancy
from postbode.ingest.accept import AcceptError, Acceptor, Submission, TemporaryAcceptError
from postbode.store.engine import Store
from postbode.store.schema import (
    deliveries,
    events,
    messages,
    raw_messages,
    stat_counters,
    suppressions,
)

RAW = (
    b"From: Shop <orders@shop.test>\r\nTo: a@dest.test\r\nSubject: Your order\r\n"
    b"X-Postbode-Tag: order-confirmation\r\nX-Postbode-Metadata-order: 42\r\n\r\nThanks!\r\n"
)


@pytest.fixture
def app_id(store: Store) -> int:
    created = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return created.app_id


def submit(store: Store, subs: list[Submission]) -> list[object]:
    async def run() -> list[object]:
        acceptor = Acceptor(store, "pb.test", allow_unverified=True)
        try:
            return await asyncio.gather(*(acceptor.accept(s) for s in subs), return_exceptions=True)
        finally:
            await acceptor.close()

    return asyncio.run(run())


def sub(app_id: int, rcpts: list[str], raw: bytes = RAW, **kw: object) -> Submission:
    return Submission(
        app_id=app_id,
        source="smtp",
        mail_from="orders@shop.test",
        recipients=rcpts,
        raw=raw,
        client_ip="127.0.0.1",
        client_name="cms",
        **kw,
    )  # type: ignore[arg-type]


def test_message_is_stored_with_a_delivery_per_recipient_and_events(
    store: Store, app_id: int
) -> None:
    (accepted,) = submit(store, [sub(app_id, ["a@dest.test", "B@Dest.Test", "a@dest.test"])])
    assert [r.email for r in accepted.recipients] == ["a@dest.test", "B@dest.test"]
    assert {r.status for r in accepted.recipients} == {"queued"}
    with store.read() as conn:
        msg = conn.execute(select(messages)).mappings().one()
        raw = zlib.decompress(conn.execute(select(raw_messages.c.data)).scalar_one())
        dels = conn.execute(select(deliveries)).mappings().all()
        types = Counter(conn.execute(select(events.c.type)).scalars())
        counters = conn.execute(select(stat_counters)).mappings().all()
    assert msg["tag"] == "order-confirmation" and msg["metadata"] == {"order": "42"}
    assert msg["subject"] == "Your order" and msg["domain_verified"] is False
    assert msg["message_id_header"].endswith("@pb.test>")
    assert raw.startswith(b"Received: from cms (127.0.0.1)")
    assert b"Message-ID: " + msg["message_id_header"].encode() in raw
    assert b"\r\nDate: " in raw
    assert b"X-Postbode" not in raw  # control headers are fields, not content
    assert raw.endswith(b"\r\n\r\nThanks!\r\n")
    assert {d["status"] for d in dels} == {"queued"} and len(dels) == 2
    assert len({d["verp_token"] for d in dels}) == 2
    assert types == {"message.received": 1, "delivery.queued": 2}
    assert {(c["event_type"], c["count"], c["tag"]) for c in counters} == {
        ("message.received", 1, "order-confirmation"),
        ("delivery.queued", 2, "order-confirmation"),
    }


def test_date_and_received_fields_tell_the_time_of_receipt(store: Store, app_id: int) -> None:
    submit(store, [sub(app_id, ["a@dest.test"])])
    with store.read() as conn:
        received_at = conn.execute(select(messages.c.received_at)).scalar_one()
        raw = zlib.decompress(conn.execute(select(raw_messages.c.data)).scalar_one())
    head = email.message_from_bytes(raw)
    stamp = head["Received"].rpartition(";")[2].strip()
    assert email.utils.parsedate_to_datetime(stamp) == received_at.replace(microsecond=0)
    assert email.utils.parsedate_to_datetime(head["Date"]) == received_at.replace(microsecond=0)


def test_suppressed_recipient_is_not_queued(store: Store, app_id: int) -> None:
    with store.write() as conn:
        conn.execute(
            insert(suppressions).values(
                app_id=app_id, email="gone@dest.test", reason="user_unknown", source="bounce"
            )
        )
    (accepted,) = submit(store, [sub(app_id, ["gone@dest.test", "ok@dest.test"])])
    assert {r.email: r.status for r in accepted.recipients} == {
        "gone@dest.test": "suppressed",
        "ok@dest.test": "queued",
    }
    with store.read() as conn:
        assert Counter(conn.execute(select(events.c.type)).scalars())["delivery.suppressed"] == 1


def test_foreign_sender_domain_and_bad_input_are_refused(store: Store, app_id: int) -> None:
    tenancy.create_app(store, "blog")
    tenancy.add_domain(store, "blog", "blog.test")
    foreign = RAW.replace(b"orders@shop.test", b"me@blog.test")
    no_from = b"Subject: x\r\n\r\nhi\r\n"
    results = submit(
        store,
        [
            sub(app_id, ["a@dest.test"], foreign),
            sub(app_id, ["a@dest.test"], no_from),
            sub(app_id, ["not-an-address"]),
            sub(app_id, ["a@dest.test"], stream="bulk"),
        ],
    )
    assert all(isinstance(r, AcceptError) for r in results), results
    assert [r.reason for r in results] == [  # type: ignore[union-attr]
        "foreign_domain",
        "no_from",
        "bad_address",
        "bad_stream",
    ]
    with store.read() as conn:
        assert conn.execute(select(messages)).first() is None


def test_concurrent_submissions_share_commits(store: Store, app_id: int) -> None:
    results = submit(store, [sub(app_id, [f"r{i}@dest.test"]) for i in range(300)])
    assert all(not isinstance(r, BaseException) for r in results)
    with store.read() as conn:
        assert len(conn.execute(select(deliveries.c.id)).all()) == 300


def test_a_commit_waits_for_messages_announced_on_their_way(store: Store, app_id: int) -> None:
    commits: list[int] = []

    def acceptor() -> Acceptor:
        # Until its first commit, a batch waits for company up to `company_wait`; after it,
        # at most as long as the last commit took.
        made = Acceptor(store, "pb.test", allow_unverified=True, company_wait=60)
        made.on_commit.append(lambda: commits.append(len(commits)))
        return made

    async def waits_for_the_message() -> None:
        accepting, session = acceptor(), object()
        try:
            accepting.announce(session)  # began a mail transaction: its message is coming
            first = asyncio.create_task(accepting.accept(sub(app_id, ["a@dest.test"])))
            await asyncio.sleep(0.2)
            assert not first.done() and not commits  # the batch waits for it
            await accepting.accept(sub(app_id, ["b@dest.test"]), session)
            assert first.done() and commits == [0]  # both in one commit
            # Nobody coming: no wait.
            await asyncio.wait_for(accepting.accept(sub(app_id, ["c@dest.test"])), 30)
            assert commits == [0, 1]
        finally:
            await accepting.close()

    async def a_transaction_without_a_message_ends_the_wait() -> None:
        accepting, session = acceptor(), object()
        try:
            accepting.announce(session)
            waiting = asyncio.create_task(accepting.accept(sub(app_id, ["d@dest.test"])))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            accepting.withdraw(session)  # RSET, a new EHLO, a dropped connection
            await asyncio.wait_for(waiting, 30)
            assert commits == [0, 1, 2]
        finally:
            await accepting.close()

    asyncio.run(waits_for_the_message())
    asyncio.run(a_transaction_without_a_message_ends_the_wait())
    with store.read() as conn:
        assert len(conn.execute(select(deliveries.c.id)).all()) == 4


def test_a_failing_store_answers_temporary_error_and_keeps_nothing_half_written(
    store: Store, app_id: int
) -> None:
    # The second message's app vanished between prepare and commit: its rows violate the
    # foreign key, the batch fails, and the retry one by one keeps the good message.
    good = sub(app_id, ["a@dest.test"])
    acceptor = Acceptor(store, "pb.test", allow_unverified=True)

    async def run() -> list[object]:
        prepared = acceptor.prepare(good)
        doomed = acceptor.prepare(sub(app_id, ["b@dest.test"]))
        doomed.sub.app_id = 999_999
        loop = asyncio.get_running_loop()
        f1, f2 = loop.create_future(), loop.create_future()
        return await loop.run_in_executor(None, acceptor._commit, [(prepared, f1), (doomed, f2)])

    first, second = asyncio.run(run())
    assert not isinstance(first, BaseException)
    assert isinstance(second, TemporaryAcceptError)
    with store.read() as conn:
        assert len(conn.execute(select(messages.c.id)).all()) == 1
        assert conn.execute(select(deliveries.c.recipient)).scalars().all() == ["a@dest.test"]


def test_one_idempotency_key_twice_in_one_batch(store: Store, app_id: int) -> None:
    from postbode.ingest.accept import IdempotencyConflict

    same = [sub(app_id, ["a@dest.test"], idempotency_key="k", request_hash="h1") for _ in range(2)]
    first, second = submit(store, same)
    assert first.id == second.id  # type: ignore[union-attr]
    other = sub(app_id, ["a@dest.test"], idempotency_key="k2", request_hash="h1")
    changed = sub(app_id, ["a@dest.test"], idempotency_key="k2", request_hash="h2")
    results = submit(store, [other, changed])  # whichever commits first wins
    conflicts = [r for r in results if isinstance(r, IdempotencyConflict)]
    assert len(conflicts) == 1 and conflicts[0].status == 409
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    with store.read() as conn:
        assert len(conn.execute(select(messages.c.id)).all()) == 2


def test_folded_control_header_is_unfolded(store: Store, app_id: int) -> None:
    raw = RAW.replace(
        b"X-Postbode-Tag: order-confirmation\r\n",
        b"X-Postbode-Tag: order-\r\n confirmation-with-a-long-name\r\n",
    )
    (accepted,) = submit(store, [sub(app_id, ["a@dest.test"], raw)])
    assert not isinstance(accepted, BaseException)
    with store.read() as conn:
        tag = conn.execute(select(messages.c.tag)).scalar_one()
    assert tag == "order- confirmation-with-a-long-name"


@pytest.mark.parametrize(
    "head",
    [
        b"From: Shop <orders@shop.test>\r\nSubject: Your order\r\nDate: x\r\n",
        b"Subject:   folded\r\n  line  \r\nFrom:  Jane   Doe <j@shop.test>\r\n",
        b"subject:\ttab\r\nMESSAGE-ID:  <abc@shop.test>  \r\nfrom: j@shop.test\r\n",
        b"From: a@shop.test\r\nFrom: b@shop.test\r\nSubject: first\r\nSubject: second\r\n",
        b"X-Other: =?utf-8?q?caf=C3=A9?=\r\nFrom: j@shop.test\r\n",
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: =?utf-8?b?SsO2cmc=?= <j@shop.test>\r\n",
        "Subject: café\r\nFrom: Jörg <j@shop.test>\r\n".encode(),
        b"Received: from x\r\n\tby y\r\nTo: t@dest.test\r\n",
    ],
)
def test_header_fields_read_as_the_email_package_reads_them(head: bytes) -> None:
    from email.parser import BytesHeaderParser
    from email.policy import SMTP

    from postbode.ingest.accept import _unfolded, _wanted_fields

    got = _wanted_fields(head, _unfolded(head))
    parsed = BytesHeaderParser(policy=SMTP).parsebytes(head + b"\r\n")
    for name in ("subject", "message-id", "date"):
        assert got.get(name) == (None if parsed[name] is None else str(parsed[name]))
    # From is kept as written (unfolded, white space collapsed); it names the same mailbox
    assert (parsed["from"] is None) == ("from" not in got)
    if parsed["from"] is not None:
        assert parsed["from"].addresses[0].addr_spec in got["from"]
        assert "\r" not in got["from"] and "\n" not in got["from"]
