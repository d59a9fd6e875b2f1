"""The delivery worker: drains the deliveries queue — claims due rows with leases, groups them by
app and recipient domain, sends each group over shared connections, renews leases meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, select

from postbode.config import Settings
from postbode.delivery.mx import MxLookup, MxResolver
from postbode.delivery.outgoing import Outgoing
from postbode.runner.owner import worker_name
from postbode.store import claim
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store
from postbode.store.schema import deliveries, utcnow

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.25  # how often an idle worker looks for mail other processes queued
SWEEP_SECONDS = 30.0  # how often expired leases (a dead worker's) are returned to the queue
MAX_PER_CONNECTION = 50  # deliveries sent over one SMTP connection before a fresh one
STOP_GRACE_SECONDS = 30.0  # on SIGTERM: how long deliveries in hand may take to finish


class DeliveryWorker:
    """One process's delivery loop."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        resolver: MxLookup | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner or worker_name()
        self.outgoing = Outgoing(
            settings, store, resolver or MxResolver.from_settings(settings), self.owner
        )
        self.lease = timedelta(seconds=settings.delivery_lease_seconds)
        self.wakeup = asyncio.Event()
        self._held: set[Any] = set()  # ids leased to this worker and not yet recorded
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self) -> None:
        """New mail was queued in this process: look now instead of at the next poll."""
        self.wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until `stop` is set; then finish (or hand back) what is in hand."""
        housekeeping = asyncio.create_task(self._housekeeping(stop))
        try:
            while not stop.is_set():
                free = self.settings.delivery_concurrency - len(self._held)
                if free <= 0:
                    await self._wait_any(stop, *self._tasks, wakeup=False)
                    continue
                rows = await asyncio.to_thread(
                    self._claim, min(free, self.settings.delivery_batch_size)
                )
                if not rows:
                    self.wakeup.clear()
                    await self._wait_any(stop, timeout=IDLE_POLL_SECONDS)
                    continue
                for domain, group in _groups(rows):
                    self._held.update(r.id for r in group)
                    task = asyncio.create_task(self._deliver(domain, group))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            await self._finish()
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping

    def _claim(self, limit: int) -> Sequence[Row[Any]]:
        with self.store.read() as conn:  # a cheap look first: idle polls take no write lock
            due = conn.execute(
                select(deliveries.c.id)
                .where(
                    deliveries.c.status.in_(DELIVERIES.due),
                    deliveries.c.next_attempt_at <= utcnow(),
                )
                .limit(1)
            ).first()
        if due is None:
            return []
        return claim.claim(self.store, DELIVERIES, self.owner, limit, self.lease)

    async def _deliver(self, domain: str, rows: list[Row[Any]]) -> None:
        try:
            jobs = await asyncio.to_thread(self.outgoing.load, rows)
            await self.outgoing.process(domain, jobs)
        except asyncio.CancelledError:
            # Stopping: what was not recorded goes back to the queue for another worker.
            await asyncio.shield(asyncio.to_thread(self._hand_back, [r.id for r in rows]))
            raise
        except Exception:
            # A bug, not a delivery problem: park these deliveries with the traceback where the
            # UI shows them, and carry on with the rest (the "shunt").
            log.exception("delivering to %s failed", domain)
            error = traceback.format_exc(limit=8)
            await asyncio.to_thread(self._park, rows, error)
        finally:
            self._held.difference_update(r.id for r in rows)

    def _park(self, rows: list[Row[Any]], error: str) -> None:
        with self.store.write() as conn:
            for row in rows:
                claim.release_in(conn, DELIVERIES, self.owner, row.id, status="held", error=error)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Renew the leases in hand (every third of the lease) and sweep dead workers' ones."""
        every = min(self.lease.total_seconds() / 3, SWEEP_SECONDS)
        while not stop.is_set():
            await self._wait_any(stop, timeout=every, wakeup=False)
            try:
                held = list(self._held)
                if held:
                    await asyncio.to_thread(
                        claim.renew, self.store, DELIVERIES, self.owner, held, self.lease
                    )
                swept = await asyncio.to_thread(claim.sweep, self.store, DELIVERIES)
            except Exception:  # the store hiccuped: try again next round, never stop renewing
                log.exception("lease housekeeping failed")
                continue
            if swept:
                log.warning("returned %d deliveries with expired leases to the queue", swept)

    async def _finish(self) -> None:
        """Let deliveries in hand finish for a while; cancelled ones hand their rows back."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _hand_back(self, ids: list[Any]) -> None:
        with self.store.write() as conn:
            for row_id in ids:
                claim.release_in(conn, DELIVERIES, self.owner, row_id, next_attempt_at=utcnow())

    async def _wait_any(
        self,
        stop: asyncio.Event,
        *tasks: asyncio.Task[None],
        timeout: float | None = None,
        wakeup: bool = True,
    ) -> None:
        """Until stop, a task finishing, new mail (if `wakeup`) or the timeout."""
        waiters = {asyncio.create_task(stop.wait())}
        if wakeup:
            waiters.add(asyncio.create_task(self.wakeup.wait()))
        await asyncio.wait({*waiters, *tasks}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def _groups(rows: Sequence[Row[Any]]) -> list[tuple[str, list[Row[Any]]]]:
    """Rows grouped by (app, recipient domain), at most MAX_PER_CONNECTION per group."""
    by_key: dict[tuple[int, str], list[Row[Any]]] = defaultdict(list)
    for row in rows:
        by_key[(row.app_id, row.recipient_domain)].append(row)
    return [
        (domain, group[i : i + MAX_PER_CONNECTION])
        for (_, domain), group in by_key.items()
        for i in range(0, len(group), MAX_PER_CONNECTION)
    ]
