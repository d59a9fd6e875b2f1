"""Three `postbode worker` processes share a PostgreSQL queue: every message once, past kill -9."""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from postbode import tenancy
from postbode.store import claim
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store
from postbode.store.schema import deliveries, messages
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import queue_mail
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import Received, SmtpSink

MESSAGES = 5_000
WORKERS = 3
LEASE_SECONDS = 5  # how long a killed worker's deliveries stay stuck before others take them
# Upper bounds only (a 2-core CI machine running other tests meanwhile); each test normally
# takes 30-60 s.
PHASE_TIMEOUT = 180.0

# PostgreSQL only: row locks and SKIP LOCKED claims between processes are the subject.
pytestmark = pytest.mark.parametrize("store", ["postgresql"], indirect=True)

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


def queue_messages(store: Store, app_id: int, count: int) -> set[str]:
    """`count` single-recipient messages, queued in one transaction (bulk inserts, no Acceptor
    round trips); returns their Message-IDs."""
    run = secrets.token_hex(4)
    mails = []
    for i in range(count):
        header = f"<{i}.{run}@shop.test>"
        raw = (
            f"From: Shop <orders@shop.test>\r\nTo: user{i}@dest.test\r\n"
            f"Subject: Order {i}\r\nMessage-ID: {header}\r\n\r\nYour order {i} has shipped.\r\n"
        ).encode()
        mails.append((header, f"user{i}@dest.test", raw))
    return set(queue_mail(store, app_id, mails))


def message_ids(received: list[Received]) -> Counter[str]:
    """How often the sink accepted each Message-ID."""
    counts: Counter[str] = Counter()
    for message in received:
        found = _MESSAGE_ID.search(message.data)
        assert found, message.data[:200]
        counts[found.group(1).decode()] += 1
    return counts


def delivered_count(store: Store) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                select(func.count()).where(deliveries.c.status == "delivered")
            ).scalar_one()
        )


def wait_delivered(store: Store, count: int, timeout: float) -> None:
    """Poll the store until `count` deliveries are recorded as delivered."""
    deadline = time.monotonic() + timeout
    while (done := delivered_count(store)) < count:
        if time.monotonic() > deadline:
            with store.read() as conn:
                rest = conn.execute(
                    select(
                        deliveries.c.status,
                        deliveries.c.lease_owner,
                        deliveries.c.attempts,
                        deliveries.c.last_reply,
                        func.count(),
                    )
                    .where(deliveries.c.status != "delivered")
                    .group_by(
                        deliveries.c.status,
                        deliveries.c.lease_owner,
                        deliveries.c.attempts,
                        deliveries.c.last_reply,
                    )
                ).all()
                errors = (
                    conn.execute(
                        select(deliveries.c.error).where(deliveries.c.error.is_not(None)).limit(1)
                    )
                    .scalars()
                    .all()
                )
            raise TimeoutError(
                f"{done} of {count} deliveries recorded within {timeout}s; the others: {rest}"
                f"; {errors}"
            )
        time.sleep(0.1)


def wait_sink(sink: SmtpSink, count: int, workers: list[PostbodeProcess], what: str) -> None:
    """Until the sink has accepted `count` messages; fails at once if a worker process dies."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while True:
        try:
            sink.wait_until_sync(lambda s: len(s.messages) >= count, 1.0, what)
            return
        except TimeoutError:
            for worker in workers:
                assert worker.proc is not None
                if worker.proc.poll() is not None:
                    raise RuntimeError(
                        f"a worker exited ({worker.proc.returncode}):\n{worker.log()[-3000:]}"
                    ) from None
            if time.monotonic() > deadline:
                raise


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:  # plain text on 127.0.0.1: this test counts, it does not inspect
        yield server


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    # No sending domain: messages go out unsigned, which keeps the workers' CPU on the queue.
    return tenancy.create_app(store, "shop")


@pytest.fixture
def start_workers(store: Store, sink: SmtpSink, tmp_path: Path) -> Iterator[Any]:
    """Start `postbode worker` processes on the test's PostgreSQL database, with dest.test
    routed to the sink; stopped (SIGTERM) at the end."""
    with ExitStack() as stack:
        dns = stack.enter_context(LoopbackDNS())  # nothing should ask; if it does, ask here

        def start(lease_seconds: int = 300) -> list[PostbodeProcess]:
            env = {
                "POSTBODE_DATABASE_URL": store.engine.url.render_as_string(hide_password=False),
                "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
                "POSTBODE_DNS_NAMESERVERS": dns.nameserver,
                "POSTBODE_SMTP_HOSTNAME": "mta.postbode.test",
                "POSTBODE_SECRET_KEY": "test-secret-key",
                "POSTBODE_DELIVERY_LEASE_SECONDS": str(lease_seconds),
                # One destination takes all the mail here: no per-domain shaping limits.
                "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
                "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
            }
            workers = [
                PostbodeProcess(tmp_path / f"worker{i}", env, command="worker")
                for i in range(WORKERS)
            ]
            for worker in workers:
                stack.enter_context(worker)
            return workers

        yield start


def test_three_workers_deliver_each_message_exactly_once(
    store: Store, shop: tenancy.NewApp, sink: SmtpSink, start_workers: Any
) -> None:
    expected = queue_messages(store, shop.app_id, MESSAGES)
    workers = start_workers()
    wait_sink(sink, MESSAGES, workers, f"{MESSAGES} messages")
    wait_delivered(store, MESSAGES, 30)

    counts = message_ids(sink.messages)
    assert set(counts) == expected
    assert [mid for mid, n in counts.items() if n > 1] == [], "no message may go out twice"
    assert len(sink.messages) == MESSAGES
    assert all(w.proc is not None and w.proc.poll() is None for w in workers)


def test_killed_workers_deliveries_are_taken_over_after_its_lease(
    store: Store, shop: tenancy.NewApp, sink: SmtpSink, start_workers: Any
) -> None:
    expected = queue_messages(store, shop.app_id, MESSAGES)
    workers = start_workers(lease_seconds=LEASE_SECONDS)
    victim = workers[0]
    assert victim.proc is not None
    wait_sink(sink, MESSAGES // 3, workers, "a third of the mail")

    # Freeze the victim first, so what it holds cannot change while we read it: a claim it
    # had not committed yet gives it nothing it could have sent. Between two batches it may
    # hold nothing; then it runs on a moment and is frozen again.
    in_flight: set[str] = set()
    for _ in range(50):
        os.kill(victim.proc.pid, signal.SIGSTOP)
        with store.read() as conn:
            in_flight = set(
                conn.execute(
                    select(messages.c.message_id_header)
                    .join(deliveries, deliveries.c.message_id == messages.c.id)
                    .where(
                        deliveries.c.status == "sending",
                        deliveries.c.lease_owner.like(f"%:{victim.proc.pid}:%"),
                    )
                ).scalars()
            )
        if in_flight:
            break
        os.kill(victim.proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    victim.kill()  # SIGKILL: no goodbye, leases left behind
    assert in_flight, "the victim held deliveries when it died"

    wait_sink(sink, MESSAGES, workers[1:], f"{MESSAGES} messages")
    wait_delivered(store, MESSAGES, 30)
    counts = message_ids(sink.messages)
    assert set(counts) == expected, "every message was delivered"
    duplicates = {mid for mid, n in counts.items() if n > 1}
    assert all(counts[mid] == 2 for mid in duplicates)
    assert duplicates <= in_flight, "only mail the dead worker had in hand may go out twice"
    assert len(sink.messages) - MESSAGES == len(duplicates) <= len(in_flight)
    with store.read() as conn:
        left = conn.execute(
            select(func.count()).where(deliveries.c.lease_owner.like(f"%:{victim.proc.pid}:%"))
        ).scalar_one()
    assert left == 0, "the others took over every lease the dead worker left"


def test_renewing_leases_while_recording_outcomes_does_not_deadlock(
    store: Store, shop: tenancy.NewApp
) -> None:
    """What one worker does on two connections at once: `Outgoing.record` releases its
    deliveries one by one in a transaction, while `_housekeeping` renews the leases on all it
    holds (those being recorded included) in one UPDATE. Neither may fail the other."""
    queue_messages(store, shop.app_id, 3)
    held = claim.claim(store, DELIVERIES, "worker-a", 10, timedelta(minutes=5))
    first, middle, last = sorted(row.id for row in held)
    errors: list[BaseException] = []
    middle_released = threading.Event()
    renewed = threading.Event()

    def record() -> None:  # as Outgoing.record: one transaction, delivery after delivery
        try:
            with store.write() as conn:
                claim.release_in(conn, DELIVERIES, "worker-a", middle, status="delivered")
                middle_released.set()
                # Go on once the renewal either waits for the row held here or is done.
                wait_for_lock_wait(store, "UPDATE deliveries SET lease_until", renewed)
                for row_id in (first, last):
                    claim.release_in(conn, DELIVERIES, "worker-a", row_id, status="delivered")
        except BaseException as exc:
            errors.append(exc)
            middle_released.set()

    def renew() -> None:  # as DeliveryWorker._housekeeping, meanwhile
        try:
            middle_released.wait(10)
            claim.renew(store, DELIVERIES, "worker-a", [first, middle, last], timedelta(minutes=5))
        except BaseException as exc:
            errors.append(exc)
        finally:
            renewed.set()

    threads = [threading.Thread(target=record), threading.Thread(target=renew)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [], f"lease renewal and recording must not deadlock: {errors[0]!r}"
    with store.read() as conn:
        statuses = conn.execute(select(deliveries.c.status)).scalars().all()
    assert statuses == ["delivered"] * 3


def wait_for_lock_wait(
    store: Store, statement: str, done: threading.Event, timeout: float = 10.0
) -> None:
    """Until another session of this database waits for a row lock in `statement`, or `done`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done.is_set():
        with store.read() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE :statement"
                ),
                {"statement": statement + "%"},
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.01)
