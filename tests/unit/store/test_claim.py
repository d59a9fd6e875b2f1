"""The leased queue: concurrent claimers never share a row; expired leases come back."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

from sqlalchemy import select, update

from postbode.store import claim
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store
from postbode.store.schema import deliveries, utcnow
from postbode.testing.factories import make_app, make_queued_message

ROWS = 2000
CLAIMERS = 4


def _fill(store: Store, n: int = ROWS) -> None:
    app = make_app(store)
    for start in range(0, n, 500):
        make_queued_message(
            store, app.app_id, [f"r{i}@dest.test" for i in range(start, min(n, start + 500))]
        )


def _claim_concurrently(store: Store, lease: timedelta, now=None) -> Counter:
    claimed: Counter = Counter()
    owners: dict = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(owner: str) -> None:
        try:
            while rows := claim.claim(store, DELIVERIES, owner, 37, lease, now=now):
                with lock:
                    for row in rows:
                        assert row.lease_owner == owner and row.status == "sending"
                        claimed[row.id] += 1
                        owners[row.id] = owner
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(CLAIMERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # the store agrees with what each claimer was told
    with store.read() as conn:
        for row_id, owner in conn.execute(select(deliveries.c.id, deliveries.c.lease_owner)):
            assert owners[row_id] == owner
    return claimed


def test_every_row_claimed_exactly_once_while_leases_hold(store: Store) -> None:
    _fill(store)
    claimed = _claim_concurrently(store, timedelta(minutes=5))
    assert len(claimed) == ROWS
    assert set(claimed.values()) == {1}
    # nothing more is due while the leases hold
    assert claim.claim(store, DELIVERIES, "late", 100, timedelta(minutes=5)) == []


def test_expired_leases_are_swept_and_claimed_again(store: Store) -> None:
    _fill(store)
    first = _claim_concurrently(store, timedelta(seconds=30))
    assert len(first) == ROWS
    assert claim.sweep(store, DELIVERIES) == 0  # leases still hold
    later = utcnow() + timedelta(minutes=1)
    assert claim.sweep(store, DELIVERIES, now=later) == ROWS
    again = _claim_concurrently(store, timedelta(minutes=5), now=later)
    assert set(again) == set(first)
    assert set(again.values()) == {1}


def test_release_by_a_worker_that_lost_its_lease_changes_nothing(store: Store) -> None:
    _fill(store, 1)
    (row,) = claim.claim(store, DELIVERIES, "old", 10, timedelta(seconds=1))
    later = utcnow() + timedelta(minutes=1)
    claim.sweep(store, DELIVERIES, now=later)
    (again,) = claim.claim(store, DELIVERIES, "new", 10, timedelta(minutes=5), now=later)
    assert again.id == row.id
    assert not claim.release(store, DELIVERIES, "old", row.id, status="delivered")
    assert claim.renew(store, DELIVERIES, "old", [row.id], timedelta(minutes=5)) == 0
    assert claim.renew(store, DELIVERIES, "new", [row.id], timedelta(minutes=5)) == 1
    assert claim.release(store, DELIVERIES, "new", row.id, status="delivered")
    with store.read() as conn:
        status, owner = conn.execute(
            select(deliveries.c.status, deliveries.c.lease_owner).where(deliveries.c.id == row.id)
        ).one()
    assert (status, owner) == ("delivered", None)


def test_only_due_rows_are_claimed(store: Store) -> None:
    _fill(store, 10)
    with store.write() as conn:
        conn.execute(update(deliveries).values(next_attempt_at=utcnow() + timedelta(hours=1)))
    assert claim.claim(store, DELIVERIES, "w", 100, timedelta(minutes=5)) == []
    rows = claim.claim(
        store, DELIVERIES, "w", 100, timedelta(minutes=5), now=utcnow() + timedelta(hours=2)
    )
    assert len(rows) == 10
