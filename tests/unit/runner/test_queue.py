"""The queue runner on both dialects: units handled, a raising handler parks its rows and the
loop goes on, store errors never stop it, leases renewed, work in hand handed back on stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Row, select
from sqlalchemy.exc import OperationalError

from postbode.runner.batch import BatchWriter
from postbode.runner.queue import QueueRunner, RunnerOptions
from postbode.store import claim
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store
from postbode.store.schema import deliveries, utcnow
from postbode.testing.factories import make_app, make_queued_message

LEASE = timedelta(seconds=30)


def fill(store: Store, recipients: Sequence[str]) -> None:
    app = make_app(store)
    make_queued_message(store, app.app_id, list(recipients))


def statuses(store: Store) -> dict[str, tuple[str, str | None, str | None]]:
    """recipient -> (status, lease owner, error)."""
    with store.read() as conn:
        return {
            r.recipient: (r.status, r.lease_owner, r.error)
            for r in conn.execute(
                select(
                    deliveries.c.recipient,
                    deliveries.c.status,
                    deliveries.c.lease_owner,
                    deliveries.c.error,
                )
            )
        }


def lease_until(store: Store) -> Any:
    """The lease of the one delivery in the store."""
    with store.read() as conn:
        return conn.execute(select(deliveries.c.lease_until)).scalar_one()


class Recording:
    """A handler that marks each row delivered, except recipients it is told to fail on
    (raises) or to hang on (waits until cancelled)."""

    queue = DELIVERIES

    def __init__(self, store: Store, fail: set[str] = frozenset(), hang: set[str] = frozenset()):
        self.store = store
        self.fail = set(fail)
        self.hang = set(hang)
        self.handled: list[str] = []
        self.hanging = asyncio.Event()
        self.owner = ""

    def prepare(self, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
        return list(rows)

    def ids(self, unit: Row[Any]) -> list[Any]:
        return [unit.id]

    async def handle(self, unit: Row[Any]) -> None:
        if unit.recipient in self.fail:
            raise RuntimeError(f"a bug while handling {unit.recipient}")
        if unit.recipient in self.hang:
            self.hanging.set()
            await asyncio.Event().wait()
        await asyncio.to_thread(self._record, unit)
        self.handled.append(unit.recipient)

    def _record(self, unit: Row[Any]) -> None:
        with self.store.write() as conn:
            assert claim.release_in(conn, DELIVERIES, self.owner, unit.id, status="delivered")


def runner_for(store: Store, handler: Recording, **options: Any) -> QueueRunner[Row[Any]]:
    opts = RunnerOptions(
        concurrency=options.pop("concurrency", 10),
        batch_size=options.pop("batch_size", 5),
        lease=options.pop("lease", LEASE),
        poll_seconds=options.pop("poll_seconds", 0.05),
        stop_grace_seconds=options.pop("stop_grace_seconds", 5.0),
    )
    runner: QueueRunner[Row[Any]] = QueueRunner("deliveries", store, handler, opts)
    handler.owner = runner.owner
    return runner


async def run_until(runner: QueueRunner[Any], done: Any, timeout: float = 30.0) -> None:
    """Run the runner until `done()` holds, then stop it and wait for it to finish."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.01)
    stop.set()
    await task


def test_every_row_is_handled_once(store: Store) -> None:
    recipients = [f"r{i}@dest.test" for i in range(23)]
    fill(store, recipients)
    handler = Recording(store)
    asyncio.run(run_until(runner_for(store, handler), lambda: len(handler.handled) == 23))
    assert sorted(handler.handled) == sorted(recipients)
    assert {s for s, _, _ in statuses(store).values()} == {"delivered"}


def test_a_raising_handler_parks_its_rows_and_the_loop_goes_on(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    fill(store, ["bad@dest.test", *(f"ok{i}@dest.test" for i in range(9))])
    handler = Recording(store, fail={"bad@dest.test"})
    with caplog.at_level(logging.ERROR):
        asyncio.run(run_until(runner_for(store, handler), lambda: len(handler.handled) == 9))
    found = statuses(store)
    status, owner, error = found.pop("bad@dest.test")
    assert (status, owner) == ("held", None)  # the deliveries queue parks as held
    assert error is not None and "a bug while handling bad@dest.test" in error
    assert "Traceback" in error
    assert {s for s, _, _ in found.values()} == {"delivered"}
    assert "handling 1 rows failed" in caplog.text


def test_a_raising_prepare_parks_the_claim_and_the_loop_goes_on(store: Store) -> None:
    fill(store, [f"r{i}@dest.test" for i in range(3)])

    class BrokenPrepare(Recording):
        calls = 0

        def prepare(self, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
            self.calls += 1
            if self.calls == 1:
                raise ValueError("cannot prepare")
            return list(rows)

    handler = BrokenPrepare(store)
    runner = runner_for(store, handler, batch_size=2)

    def parked() -> int:
        return sum(s == "held" for s, _, _ in statuses(store).values())

    asyncio.run(run_until(runner, lambda: parked() == 2 and len(handler.handled) == 1))
    assert all(
        e is not None and "cannot prepare" in e
        for s, _, e in statuses(store).values()
        if s == "held"
    )


class FlakyStore(Store):
    """A real store whose next `failures` write transactions fail as if the database were
    gone for a moment (fault injection: the store's own errors, not a mock of it)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.engine)
        self.failures = 0
        self.failed = 0

    @contextmanager
    def write(self) -> Iterator[Connection]:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            raise OperationalError("BEGIN", {}, Exception("database is restarting"))
        with super().write() as conn:
            yield conn


def test_store_errors_while_claiming_are_logged_and_the_loop_carries_on(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    fill(store, [f"r{i}@dest.test" for i in range(5)])
    flaky = FlakyStore(store)
    flaky.failures = 3
    handler = Recording(flaky)
    with caplog.at_level(logging.ERROR):
        asyncio.run(run_until(runner_for(flaky, handler), lambda: len(handler.handled) == 5))
    assert flaky.failed == 3
    assert caplog.text.count("store call") >= 3


def test_leases_in_hand_are_renewed_and_renewal_survives_store_errors(store: Store) -> None:
    fill(store, ["slow@dest.test"])
    flaky = FlakyStore(store)
    handler = Recording(flaky, hang={"slow@dest.test"})
    runner = runner_for(flaky, handler, lease=timedelta(seconds=0.6))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.wait_for(handler.hanging.wait(), 10)
        first = lease_until(store)
        flaky.failures = 1  # the next renewal fails; the one after must still happen
        async with asyncio.timeout(10):
            while lease_until(store) <= first or flaky.failures:
                await asyncio.sleep(0.05)
        later = lease_until(store)
        assert later > first
        async with asyncio.timeout(10):
            while lease_until(store) <= later:
                await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(scenario())
    assert flaky.failed == 1


def test_leases_stay_renewed_while_work_in_hand_finishes_after_a_stop(store: Store) -> None:
    """The grace after a stop may outlast a short lease: a row still being sent must not
    lapse, or the sweep would hand it to another worker and it would go out twice."""
    fill(store, ["slow@dest.test"])
    handler = Recording(store, hang={"slow@dest.test"})
    runner = runner_for(store, handler, lease=timedelta(seconds=0.6), stop_grace_seconds=30)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.wait_for(handler.hanging.wait(), 10)
        stop.set()  # the unit hangs on: the runner is in its grace
        renewed = lease_until(store)
        async with asyncio.timeout(10):
            for _ in range(3):  # three renewals after the stop, each past the one before
                while lease_until(store) <= renewed:
                    await asyncio.sleep(0.05)
                renewed = lease_until(store)
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_stopping_hands_back_what_is_in_hand(store: Store) -> None:
    fill(store, ["slow@dest.test", "fast@dest.test"])
    handler = Recording(store, hang={"slow@dest.test"})
    runner = runner_for(store, handler, stop_grace_seconds=0.2)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.wait_for(handler.hanging.wait(), 10)
        async with asyncio.timeout(10):
            while "fast@dest.test" not in handler.handled:
                await asyncio.sleep(0.01)
        stop.set()  # as SIGTERM does in `postbode worker`
        await task

    started = utcnow()
    asyncio.run(scenario())
    found = statuses(store)
    assert found["fast@dest.test"][0] == "delivered"
    assert found["slow@dest.test"][:2] == ("deferred", None)  # back in the queue, unleased
    with store.read() as conn:
        due = conn.execute(
            select(deliveries.c.next_attempt_at).where(deliveries.c.recipient == "slow@dest.test")
        ).scalar_one()
    assert due >= started - timedelta(seconds=1)  # due again at once, for another worker


def test_batch_writer_gives_each_submitter_its_own_result() -> None:
    written: list[list[int]] = []

    def write(batch: list[int]) -> list[BaseException | None] | None:
        written.append(batch)
        if 13 in batch:
            return [ValueError("unlucky") if i == 13 else None for i in batch]
        return None

    async def scenario() -> list[Any]:
        writer: BatchWriter[int] = BatchWriter(write)
        return await asyncio.gather(*(writer.submit(i) for i in range(20)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(r).__name__ for r in results].count("ValueError") == 1
    assert isinstance(results[13], ValueError)
    assert sorted(i for batch in written for i in batch) == list(range(20))
    assert len(written) < 20  # submitted together, written together


def test_a_store_outage_while_handling_hands_the_rows_back_instead_of_parking(
    store: Store,
) -> None:
    fill(store, ["r@dest.test"])
    flaky = FlakyStore(store)

    class StoreGoesAway(Recording):
        tries = 0

        def _record(self, unit: Row[Any]) -> None:
            self.tries += 1
            if self.tries == 1:
                flaky.failures = 1  # the database restarts just as we record
            super()._record(unit)

    handler = StoreGoesAway(flaky)
    asyncio.run(run_until(runner_for(flaky, handler), lambda: handler.handled == ["r@dest.test"]))
    assert handler.tries == 2  # handed back, claimed again, recorded
    assert statuses(store)["r@dest.test"] == ("delivered", None, None)


def test_a_store_outage_while_preparing_hands_the_claim_back_instead_of_parking(
    store: Store,
) -> None:
    fill(store, ["r1@dest.test", "r2@dest.test"])

    class StoreGoesAway(Recording):
        calls = 0

        def prepare(self, rows: Sequence[Row[Any]]) -> list[Row[Any]]:
            self.calls += 1
            if self.calls == 1:  # prepare reads the store (the deliveries' load): it is away
                raise OperationalError("SELECT", {}, Exception("database is restarting"))
            return list(rows)

    handler = StoreGoesAway(store)
    runner = runner_for(store, handler)
    asyncio.run(run_until(runner, lambda: len(handler.handled) == 2))
    assert handler.calls == 2  # handed back, claimed again, prepared and handled
    assert {s for s, _, _ in statuses(store).values()} == {"delivered"}


class CountingReads(Store):
    """A real store that counts its read transactions."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.engine)
        self.reads = 0

    @contextmanager
    def read(self) -> Iterator[Connection]:
        self.reads += 1
        with super().read() as conn:
            yield conn


@pytest.mark.parametrize("wakeups_mean_work", [True, False])
def test_a_wakeup_that_means_work_is_claimed_without_a_look_first(
    store: Store, wakeups_mean_work: bool
) -> None:
    counting = CountingReads(store)
    handler = Recording(counting)
    runner = runner_for(counting, handler, poll_seconds=30.0)
    runner.options = dataclasses.replace(runner.options, wakeups_mean_work=wakeups_mean_work)

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        async with asyncio.timeout(10):
            while counting.reads == 0:  # the first look, finding nothing: the runner waits
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        before = counting.reads
        fill(store, ["r@dest.test"])
        runner.notify()
        async with asyncio.timeout(10):
            while handler.handled != ["r@dest.test"]:
                await asyncio.sleep(0.01)
        stop.set()
        await task
        return counting.reads - before

    looks = asyncio.run(scenario())
    assert looks == (0 if wakeups_mean_work else 1)
