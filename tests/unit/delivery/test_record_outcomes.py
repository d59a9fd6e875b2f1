"""Recording a connection's outcomes: one statement per table for the batch, the counters
bumped once per counter row, and one by one (each in a savepoint) when the batch fails."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import pytest
from sqlalchemy import event, func, select, update

from postbode.config import Settings
from postbode.delivery.outcomes import Delivered, HardFail, Reply, SoftFail
from postbode.delivery.outgoing import Job, Outgoing
from postbode.delivery.shaping import Wait
from postbode.delivery.smtp_sender import Attempt, TranscriptLine
from postbode.store import claim
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store
from postbode.store.schema import (
    attempts,
    deliveries,
    events,
    stat_counters,
    suppressions,
    utcnow,
    webhook_requests,
)
from postbode.testing.factories import events_refused_for, make_app, make_queued_message
from postbode.webhooks import manage

OWNER = "worker-under-test"


def _attempt(reply: Reply | None) -> Attempt:
    return Attempt(
        mx_host="mx1.dest.test",
        ip="127.0.0.1",
        port=25,
        started_at=utcnow(),
        duration=0.012,
        tls_version=None,
        tls_cipher=None,
        final_reply=reply,
        transcript=(TranscriptLine(0.0, "S", "220 mx1.dest.test"), TranscriptLine(0.01, "C", ".")),
    )


def _jobs(settings: Settings, store: Store, recipients: list[str]) -> tuple[Outgoing, list[Job]]:
    """Deliveries queued to `recipients`, claimed by OWNER and loaded as jobs."""
    app = make_app(store)
    manage.create_webhook(store, app.app_id, "https://hooks.test/in")
    for rcpt in recipients:
        make_queued_message(store, app.app_id, [rcpt])
    rows = claim.claim(store, DELIVERIES, OWNER, len(recipients), timedelta(minutes=5))
    outgoing = Outgoing(settings, store, cast(Any, None), OWNER)
    loaded = sorted(outgoing.load(rows), key=lambda j: j.id)  # ids follow queueing order
    by_rcpt: dict[str, list[Job]] = {}
    for job in loaded:
        by_rcpt.setdefault(job.recipient, []).append(job)
    return outgoing, [by_rcpt[r].pop(0) for r in recipients]


def _mixed(settings: Settings, store: Store) -> tuple[Outgoing, list[Job]]:
    """Three delivered, a greylisting, a hard bounce and a shaping wait, as one batch."""
    rcpts = ["a@dest.test", "b@dest.test", "c@dest.test", "grey@dest.test", "gone@dest.test"]
    outgoing, jobs = _jobs(settings, store, [*rcpts, "wait@dest.test"])
    ok = Reply(250, "2.0.0", "OK")
    for job in jobs[:3]:
        job.outcome, job.attempt = Delivered(reply=ok), _attempt(ok)
    grey = Reply(451, "4.7.1", "greylisted, try again later")
    jobs[3].outcome = SoftFail(reply=grey, retry_after=None, reason="greylisted")
    jobs[3].attempt = _attempt(grey)
    gone = Reply(550, "5.1.1", "no such user")
    jobs[4].outcome, jobs[4].attempt = HardFail(reply=gone, reason="no such user"), _attempt(gone)
    jobs[5].wait = Wait(until=utcnow() + timedelta(seconds=30), reason="waiting", limit="rate")
    return outgoing, jobs


def _snapshot(store: Store) -> dict[str, Any]:
    """What recording wrote, without ids and times that differ from run to run."""
    with store.read() as conn:
        rows = conn.execute(select(deliveries).order_by(deliveries.c.recipient)).mappings().all()
        ids = {r["id"]: r["recipient"] for r in rows}
        return {
            "deliveries": [
                (
                    r["recipient"],
                    r["status"],
                    r["attempts"],
                    r["lease_owner"],
                    r["mx"],
                    r["last_reply"],
                    r["bounce_category"],
                    r["hard"],
                )
                for r in rows
            ],
            "attempts": sorted(
                (ids[a.delivery_id], a.outcome, a.reply_code, a.reply_text, a.transcript)
                for a in conn.execute(select(attempts))
            ),
            "events": sorted(
                (e.recipient, e.type, sorted(k for k in e.data if k != "next_attempt_at"))
                for e in conn.execute(select(events))
            ),
            "counters": sorted(
                (c.event_type, c.count, c.bot_count) for c in conn.execute(select(stat_counters))
            ),
            "webhook_requests": conn.execute(
                select(func.count()).select_from(webhook_requests)
            ).scalar_one(),
            "suppressions": sorted(s.email for s in conn.execute(select(suppressions.c.email))),
        }


EXPECTED = {
    "deliveries": [
        ("a@dest.test", "delivered", 1, None, "mx1.dest.test", "250 2.0.0 OK", None, None),
        ("b@dest.test", "delivered", 1, None, "mx1.dest.test", "250 2.0.0 OK", None, None),
        ("c@dest.test", "delivered", 1, None, "mx1.dest.test", "250 2.0.0 OK", None, None),
        ("gone@dest.test", "bounced", 1, None, "mx1.dest.test", "550 5.1.1 no such user",
         "user_unknown", True),
        ("grey@dest.test", "deferred", 1, None, "mx1.dest.test",
         "451 4.7.1 greylisted, try again later", None, None),
        ("wait@dest.test", "deferred", 0, None, None, "waiting", None, None),
    ],
    "counters": [
        ("delivery.bounced", 1, 0),
        ("delivery.deferred", 1, 0),
        ("delivery.delivered", 3, 0),  # one row, counted once for the batch
    ],
    "webhook_requests": 5,  # one per event; the shaping wait has none
    "suppressions": ["gone@dest.test"],
}  # fmt: skip


@contextlib.contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """The SQL statements sent to the database meanwhile (an executemany counts once)."""
    seen: list[str] = []

    def note(*args: Any) -> None:
        seen.append(args[2])

    event.listen(store.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", note)


def test_a_batch_records_every_outcome_as_one_by_one_would(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    outgoing, jobs = _mixed(settings, store)
    outgoing.record(jobs)
    batched = _snapshot(store)
    assert batched["deliveries"] == EXPECTED["deliveries"]
    assert {k: batched[k] for k in EXPECTED} == EXPECTED
    assert len(batched["attempts"]) == 5 and len(batched["events"]) == 5

    # The same outcomes recorded one by one (the fallback) write the same rows.
    outgoing, jobs = _mixed(settings, store)
    with store.write() as conn:  # only the second batch's rows are compared
        for table in (webhook_requests, events, attempts, stat_counters, suppressions):
            conn.execute(table.delete())
        conn.execute(deliveries.delete().where(deliveries.c.lease_owner.is_(None)))
    monkeypatch.setattr(Outgoing, "_write_batch", lambda self, conn, plans, ready: False)
    outgoing.record(jobs)
    assert _snapshot(store) == batched


def test_a_batch_takes_one_statement_per_table_however_large(
    settings: Settings, store: Store
) -> None:
    counts = []
    for size in (3, 12):
        outgoing, jobs = _jobs(settings, store, [f"r{i}-{size}@dest.test" for i in range(size)])
        ok = Reply(250, "2.0.0", "OK")
        for job in jobs:
            job.outcome, job.attempt = Delivered(reply=ok), _attempt(ok)
        with statements(store) as seen:
            outgoing.record(jobs)
        counts.append(len(seen))
    assert counts[0] == counts[1], counts
    with store.read() as conn:
        delivered = conn.execute(
            select(stat_counters.c.count).where(stat_counters.c.event_type == "delivery.delivered")
        ).all()
    assert sorted(c for (c,) in delivered) == [3, 12]  # two apps: one counter row each


def test_a_failing_outcome_parks_only_itself_and_the_batch_is_recorded_one_by_one(
    settings: Settings, store: Store
) -> None:
    outgoing, jobs = _mixed(settings, store)
    with events_refused_for(store, "b@dest.test"):
        outgoing.record(jobs)
    snap = _snapshot(store)
    b = [d for d in snap["deliveries"] if d[0] == "b@dest.test"]
    assert b == [("b@dest.test", "held", 0, None, None, None, None, None)], "parked whole"
    with store.read() as conn:
        error = conn.execute(
            select(deliveries.c.error).where(deliveries.c.recipient == "b@dest.test")
        ).scalar_one()
    assert "poisoned event" in error
    assert [d for d in snap["deliveries"] if d[0] != "b@dest.test"] == [
        d for d in EXPECTED["deliveries"] if d[0] != "b@dest.test"
    ]
    assert "b@dest.test" not in {a[0] for a in snap["attempts"]}, "no half-recorded outcome"
    assert len(snap["attempts"]) == 4 and len(snap["events"]) == 4
    assert snap["counters"] == [
        ("delivery.bounced", 1, 0),
        ("delivery.deferred", 1, 0),
        ("delivery.delivered", 2, 0),
    ]
    assert snap["webhook_requests"] == 4 and snap["suppressions"] == ["gone@dest.test"]


def test_a_lost_lease_records_nothing_for_that_delivery_and_all_for_the_rest(
    settings: Settings, store: Store
) -> None:
    outgoing, jobs = _mixed(settings, store)
    with store.write() as conn:  # expired and claimed by another worker meanwhile
        conn.execute(
            update(deliveries)
            .where(deliveries.c.recipient == "a@dest.test")
            .values(lease_owner="another-worker")
        )
    outgoing.record(jobs)
    snap = _snapshot(store)
    assert snap["deliveries"][0] == ("a@dest.test", "sending", 0, "another-worker", None, None,
                                     None, None)  # fmt: skip
    assert snap["deliveries"][1:] == EXPECTED["deliveries"][1:]
    assert "a@dest.test" not in {e[0] for e in snap["events"]}
    assert ("delivery.delivered", 2, 0) in snap["counters"]


def test_repeated_soft_bounces_in_one_batch_suppress_as_one_by_one(
    settings: Settings, store: Store
) -> None:
    """Whether a soft bounce suppresses depends on how many came before it: the second of
    three to one address (at a threshold of two) is the one that suppresses, as when each
    was recorded in its own transaction."""
    settings = settings.model_copy(update={"soft_bounce_suppress_count": 2})
    outgoing, jobs = _jobs(settings, store, ["full@dest.test"] * 3)
    full = Reply(552, "5.2.2", "mailbox full")
    for job in jobs:
        job.outcome, job.attempt = HardFail(reply=full, reason="mailbox full"), _attempt(full)
    outgoing.record(jobs)
    assert {j.classification.hard for j in jobs if j.classification} == {False}
    with store.read() as conn:
        (entry,) = conn.execute(select(suppressions)).all()
        statuses = conn.execute(select(deliveries.c.status)).scalars().all()
    assert statuses == ["bounced"] * 3
    assert entry.message_id == jobs[1].row.message_id
    assert (entry.detail or "").startswith("2 soft bounces")
