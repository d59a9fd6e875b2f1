"""The delivery worker: drains the deliveries queue through the runner — claimed rows grouped by
app and recipient domain, each group sent over shared connections by the outgoing processor."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Row

from postbode.config import Settings
from postbode.delivery.mx import MxLookup, MxResolver
from postbode.delivery.outgoing import Job, Outgoing
from postbode.runner.owner import worker_name
from postbode.runner.queue import QueueRunner, RunnerOptions
from postbode.store.claim import DELIVERIES
from postbode.store.engine import Store

MAX_PER_CONNECTION = 50  # deliveries sent over one SMTP connection before a fresh one
STOP_GRACE_SECONDS = 30.0  # on SIGTERM: how long deliveries in hand may take to finish

Group = tuple[str, list[Job]]  # (recipient domain, its deliveries loaded)


# A woken idle runner waits this long before claiming: below full load one claim, one load,
# one SMTP session and one outcome transaction then serve the messages of several commits
# instead of one or two (each of those costs about as much for one message as for fifty).
# At 0.02 s a claim at C=10 held about 10 deliveries; at 0.1 s about 20-30, for 0.1 s more
# from accept to delivery.
GATHER_SECONDS = 0.1


def options(settings: Settings) -> RunnerOptions:
    """How much one process's delivery runner takes on, from the settings."""
    return RunnerOptions(
        concurrency=settings.delivery_concurrency,
        batch_size=settings.delivery_batch_size,
        lease=timedelta(seconds=settings.delivery_lease_seconds),
        poll_seconds=settings.runner_poll_seconds,
        gather_seconds=GATHER_SECONDS,
        wakeups_mean_work=True,  # serve wakes a worker after a commit that queued deliveries
        stop_grace_seconds=STOP_GRACE_SECONDS,
    )


class DeliveryHandler:
    """The deliveries queue's handler: a unit is one connection's worth of deliveries."""

    queue = DELIVERIES

    def __init__(self, outgoing: Outgoing) -> None:
        self.outgoing = outgoing

    def prepare(self, rows: Sequence[Row[Any]]) -> list[Group]:
        # The whole claim loaded here (in the runner's thread), in one read: not a read and a
        # trip to a thread for each group.
        return groups(self.outgoing.load(rows))

    def ids(self, unit: Group) -> list[Any]:
        return [job.id for job in unit[1]]

    async def handle(self, unit: Group) -> None:
        domain, jobs = unit
        await self.outgoing.process(domain, jobs)


class DeliveryWorker:
    """One process's delivery loop: the outgoing processor under a queue runner."""

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
        self.runner: QueueRunner[Group] = QueueRunner(
            "deliveries", store, DeliveryHandler(self.outgoing), options(settings), owner=self.owner
        )

    def notify(self) -> None:
        """New mail was queued: look now instead of at the next poll."""
        self.runner.notify()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and deliver until `stop` is set; then finish (or hand back) what is in hand."""
        await self.runner.run(stop)


def groups(jobs: Sequence[Job]) -> list[Group]:
    """Jobs grouped by (app, recipient domain), at most MAX_PER_CONNECTION per group."""
    by_key: dict[tuple[int, str], list[Job]] = defaultdict(list)
    for job in jobs:
        by_key[(job.row.app_id, job.row.recipient_domain)].append(job)
    return [
        (domain, group[i : i + MAX_PER_CONNECTION])
        for (_, domain), group in by_key.items()
        for i in range(0, len(group), MAX_PER_CONNECTION)
    ]
