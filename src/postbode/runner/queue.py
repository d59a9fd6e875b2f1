"""The queue runner: one loop for every leased queue — claim due rows, hand them to the queue's
handler, renew leases while they are in hand, park what a bug broke, hand back on stop."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import Counter, Histogram
from sqlalchemy import Row, bindparam, select

from postbode.runner.owner import worker_name
from postbode.store import claim
from postbode.store.claim import Queue
from postbode.store.engine import Store
from postbode.store.retry import is_transient
from postbode.store.schema import utcnow

log = logging.getLogger(__name__)

U = TypeVar("U")

STORE_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)  # waits after consecutive store errors

RUNNER_ITEMS = Counter(
    "postbode_runner_items_total",
    "Queue rows a runner finished, by queue and how: handled, parked (a bug), handed back.",
    ["queue", "how"],
)
RUNNER_CLAIM_SIZE = Histogram(
    "postbode_runner_claim_size",
    "Rows per claim that found work, by queue (small claims cost more CPU per row).",
    ["queue"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
RUNNER_STORE_ERRORS = Counter(
    "postbode_runner_store_errors_total",
    "Store errors a runner survived (claim, renew, park), by queue.",
    ["queue"],
)


class Handler(Protocol[U]):
    """What a queue runner needs of one queue's work.

    A unit is what one task handles: one row (a webhook request) or several sent together (a
    connection's deliveries). `handle` must end the lease of every row of its unit — recording
    its outcome with `claim.release_in` or the like — before it returns; rows it leaves leased
    are handed back to the queue when the runner stops, or parked if `handle` raised."""

    queue: Queue

    def prepare(self, rows: Sequence[Row[Any]]) -> list[U]:
        """Claimed rows into units of work (runs in a thread: may read the store)."""
        ...

    def ids(self, unit: U) -> list[Any]:
        """The queue row ids a unit holds."""
        ...

    async def handle(self, unit: U) -> None:
        """Do the work and record its outcome."""
        ...


@dataclass(frozen=True)
class RunnerOptions:
    """How much one process's runner of a queue takes on."""

    concurrency: int  # rows in hand at once
    batch_size: int  # rows per claim at most
    lease: timedelta  # how long a claimed row stays ours without renewal
    poll_seconds: float = 0.25  # idle: how often to look for work no wake-up announced
    # Idle and woken: how long to let further commits land before claiming, so that one claim
    # (one write transaction) takes the rows of several small commits together.
    gather_seconds: float = 0.0
    stop_grace_seconds: float = 30.0  # on stop: how long the work in hand may take to finish
    # A wake-up means rows of this queue were queued: the claim after one skips the look (a
    # read transaction) that spares idle polls the write lock.
    wakeups_mean_work: bool = False


class QueueRunner(Generic[U]):
    """Drains one queue in one process: at most `concurrency` rows in hand, each unit its own
    task. Every exception is caught once per unit (its rows are parked with the traceback
    where the UI shows them) or once per store call (logged, retried after a pause): nothing
    a handler or the store does stops the loop, and no claimed row is dropped silently."""

    def __init__(
        self,
        name: str,
        store: Store,
        handler: Handler[U],
        options: RunnerOptions,
        *,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.handler = handler
        self.options = options
        self.queue = handler.queue
        self.owner = owner or worker_name()
        self.wakeup = asyncio.Event()
        self._held: set[Any] = set()  # ids claimed by this runner whose unit has not ended
        self._tasks: set[asyncio.Task[None]] = set()
        self._store_errors = 0
        t = self.queue.table
        # Made once: building and compiling the statement cost more than running it.
        self._look = (
            select(t.c.id)
            .where(t.c.status.in_(self.queue.due), t.c.next_attempt_at <= bindparam("now"))
            .limit(1)
        )

    @property
    def in_hand(self) -> int:
        return len(self._held)

    def notify(self) -> None:
        """Work was queued: look now instead of at the next poll (call on the runner's loop)."""
        self.wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and handle until `stop` is set; then let the work in hand finish for a while
        and hand back what did not."""
        # Leases are renewed until the work in hand has finished or been handed back, not
        # only until `stop`: the grace after a stop (or a pause) may outlast a short lease,
        # and a lapsed lease lets the sweep hand a row that is still being sent to another.
        finished = asyncio.Event()
        renewing = asyncio.create_task(self._renew_forever(finished), name=f"{self.name}-renew")
        # Whether work is likely due: after a full claim, or a wake-up where they mean work.
        # Then the claim goes ahead without the look that spares idle polls the write lock.
        likely = False
        try:
            while not stop.is_set():
                free = self.options.concurrency - len(self._held)
                if free <= 0:
                    await self._wait(stop, *self._tasks, wakeup=False)
                    continue
                limit = min(free, self.options.batch_size)
                likely = likely or (self.options.wakeups_mean_work and self.wakeup.is_set())
                # Wake-ups from here on are for rows this claim may not see: they stay set.
                self.wakeup.clear()
                rows = await self._store_call(self._claim, limit, likely, stop=stop)
                if rows is None:  # the store failed; _store_call waited
                    continue
                if rows:
                    RUNNER_CLAIM_SIZE.labels(self.name).observe(len(rows))
                    await self._start(rows)
                likely = len(rows) >= limit
                if len(rows) < limit:
                    # Everything due was taken: no second look until a wake-up or the poll
                    # (at low concurrency that look was a read for nothing after each claim).
                    await self._wait(stop, timeout=self.options.poll_seconds)
                    if self.wakeup.is_set() and self.options.gather_seconds > 0:
                        await self._wait(stop, timeout=self.options.gather_seconds, wakeup=False)
        finally:
            await self._finish()
            finished.set()
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    # -- claiming ----------------------------------------------------------------------------

    def _claim(self, limit: int, likely: bool = False) -> Sequence[Row[Any]]:
        """Up to `limit` due rows leased to us. Unless work is `likely` due, a cheap look
        comes first, so that idle polls take no write lock."""
        if not likely:
            with self.store.read() as conn:
                due = conn.execute(self._look, {"now": utcnow()}).first()
            if due is None:
                return []
        return claim.claim(self.store, self.queue, self.owner, limit, self.options.lease)

    async def _start(self, rows: Sequence[Row[Any]]) -> None:
        ids = [r.id for r in rows]
        self._held.update(ids)
        try:
            units = await asyncio.to_thread(self.handler.prepare, rows)
        except Exception as exc:
            if is_transient(exc):  # the store was away (prepare may read it): hand them back
                log.warning(
                    "%s: the store failed while preparing %d rows (%s); handing them back",
                    self.name,
                    len(rows),
                    exc,
                )
                await self._hand_back(ids)
                self._held.difference_update(ids)
                return
            # a bug in preparing: park the whole claim, go on with the queue
            log.exception("%s: preparing %d claimed rows failed", self.name, len(rows))
            await self._park(ids, traceback.format_exc(limit=8))
            self._held.difference_update(ids)
            return
        covered: set[Any] = set()
        for unit in units:
            unit_ids = self.handler.ids(unit)
            covered.update(unit_ids)
            task = asyncio.create_task(self._run_unit(unit, unit_ids))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        left = [i for i in ids if i not in covered]
        if left:  # prepared into no unit: nothing will end their lease but us
            log.error("%s: %d claimed rows were left out of every unit", self.name, len(left))
            await self._park(left, "claimed but not prepared for handling (a bug)")
            self._held.difference_update(left)

    async def _run_unit(self, unit: U, ids: list[Any]) -> None:
        try:
            await self.handler.handle(unit)
            RUNNER_ITEMS.labels(self.name, "handled").inc(len(ids))
        except asyncio.CancelledError:
            # Stopping: what was not recorded goes back to the queue for another worker.
            await asyncio.shield(self._hand_back(ids))
            raise
        except Exception as exc:
            if is_transient(exc):
                # The store was away (a restart, a dropped connection): not the rows' fault.
                # They go back to the queue for the next try.
                log.warning(
                    "%s: the store failed while handling %d rows (%s); handing them back",
                    self.name,
                    len(ids),
                    exc,
                )
                await self._hand_back(ids)
                return
            # A bug, not a failure of the work itself (handlers record those as outcomes):
            # park the unit's rows with the traceback where the UI shows them (the "shunt").
            log.exception("%s: handling %d rows failed", self.name, len(ids))
            await self._park(ids, traceback.format_exc(limit=8))
        finally:
            self._held.difference_update(ids)

    # -- ending leases that handlers did not end ------------------------------------------------

    async def _park(self, ids: list[Any], error: str) -> None:
        """Rows still leased to us go to the queue's parked status with `error` (rows the
        handler already recorded are not ours any more and stay as recorded)."""

        def park() -> int:
            return claim.park(self.store, self.queue, self.owner, ids, error)

        parked = await self._store_call(park, attempts=3)
        if parked:
            RUNNER_ITEMS.labels(self.name, "parked").inc(parked)
        elif parked is None:
            log.error(
                "%s: could not park %d rows; their leases will expire and the sweep returns them",
                self.name,
                len(ids),
            )

    async def _hand_back(self, ids: list[Any]) -> None:
        def hand_back() -> int:
            return claim.hand_back(self.store, self.queue, self.owner, ids)

        returned = await self._store_call(hand_back, attempts=3)
        if returned:
            RUNNER_ITEMS.labels(self.name, "handed_back").inc(returned)

    # -- leases --------------------------------------------------------------------------------

    async def _renew_forever(self, finished: asyncio.Event) -> None:
        """Renew the leases in hand every third of the lease, whatever the store does, until
        `finished`."""
        every = self.options.lease.total_seconds() / 3
        while not finished.is_set():
            await self._wait(finished, timeout=every, wakeup=False)
            held = list(self._held)
            if held:

                def renew(held: list[Any] = held) -> int:
                    return claim.renew(self.store, self.queue, self.owner, held, self.options.lease)

                await self._store_call(renew, attempts=1)

    async def _finish(self) -> None:
        """Let units in hand finish for a while; cancelled ones hand their rows back."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.options.stop_grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._held:  # claimed, not yet in a unit when the stop came
            await self._hand_back(list(self._held))
            self._held.clear()

    # -- helpers -------------------------------------------------------------------------------

    async def _store_call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        stop: asyncio.Event | None = None,
        attempts: int = 1,
    ) -> Any:
        """`fn(*args)` in a thread; on a store error: logged, counted, a pause growing with
        consecutive errors, and None (after `attempts` tries)."""
        for attempt in range(attempts):
            try:
                result = await asyncio.to_thread(fn, *args)
            except Exception:
                self._store_errors += 1
                RUNNER_STORE_ERRORS.labels(self.name).inc()
                pause = STORE_RETRY_SECONDS[min(self._store_errors, len(STORE_RETRY_SECONDS)) - 1]
                log.exception("%s: store call %s failed; again in %g s", self.name, fn, pause)
                if stop is not None:
                    await self._wait(stop, timeout=pause, wakeup=False)
                elif attempt + 1 < attempts:
                    await asyncio.sleep(pause)
                continue
            self._store_errors = 0
            return result
        return None

    async def _wait(
        self,
        stop: asyncio.Event,
        *tasks: asyncio.Future[Any],
        timeout: float | None = None,
        wakeup: bool = True,
    ) -> None:
        """Until stop, a task finishing, a wake-up (if `wakeup`) or the timeout."""
        await wait_any(stop, *tasks, self.wakeup if wakeup else None, timeout=timeout)


async def wait_any(
    *what: asyncio.Event | asyncio.Future[Any] | None, timeout: float | None = None
) -> None:
    """Until any of the events is set or futures done, or `timeout` seconds."""
    waiters: set[asyncio.Future[Any]] = set()
    made: list[asyncio.Task[Any]] = []
    for item in what:
        if item is None:
            continue
        if isinstance(item, asyncio.Event):
            if item.is_set():
                return
            task = asyncio.ensure_future(item.wait())
            made.append(task)
            waiters.add(task)
        else:
            waiters.add(item)
    if not waiters:
        await asyncio.sleep(timeout or 0)
        return
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in made:
            task.cancel()
        await asyncio.gather(*made, return_exceptions=True)
