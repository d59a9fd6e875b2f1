"""Wake-ups across nodes on PostgreSQL: a commit that queues work NOTIFYs, idle runners LISTEN
(polling only as the fallback), and the listener survives losing its connection."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text, update

from postbode.runner.queue import QueueRunner
from postbode.runner.wakeup import Listener, channel
from postbode.store.engine import Store
from postbode.store.schema import deliveries, utcnow
from postbode.testing.factories import make_app, make_queued_message

from .test_queue import Recording, runner_for

pytestmark = pytest.mark.parametrize("store", ["postgresql"], indirect=True)


class Woken:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


def test_queuing_a_delivery_wakes_a_listener_and_a_due_retry_does_too(store: Store) -> None:
    app = make_app(store)

    async def scenario() -> None:
        woken = Woken()
        listener = Listener(store, {channel("deliveries"): woken})
        stop = asyncio.Event()
        task = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.connected.wait(), 10)
        await woken.next()  # once on connecting: work queued before it listened
        await asyncio.to_thread(make_queued_message, store, app.app_id, ["a@dest.test"])
        await woken.next()
        # A retry put back by hand (deferred, due later -> due now) wakes workers too.
        with store.write() as conn:
            conn.execute(
                update(deliveries).values(
                    status="deferred", next_attempt_at=utcnow() + timedelta(hours=1)
                )
            )
        await asyncio.sleep(0.2)
        woken.event.clear()
        with store.write() as conn:
            conn.execute(update(deliveries).values(next_attempt_at=utcnow()))
        await woken.next()
        stop.set()
        await task

    asyncio.run(scenario())


def test_an_idle_runner_is_woken_by_another_nodes_commit_not_by_its_poll(store: Store) -> None:
    app = make_app(store)
    handler = Recording(store)
    runner: QueueRunner = runner_for(store, handler, poll_seconds=3600)

    async def scenario() -> None:
        listener = Listener(store, {channel("deliveries"): runner.notify})
        stop = asyncio.Event()
        tasks = [asyncio.create_task(listener.run(stop)), asyncio.create_task(runner.run(stop))]
        await asyncio.wait_for(listener.connected.wait(), 10)
        await asyncio.sleep(0.3)  # the runner has looked once, found nothing, and sleeps
        await asyncio.to_thread(make_queued_message, store, app.app_id, ["b@dest.test"])
        async with asyncio.timeout(30):  # far less than the hour-long poll
            while handler.handled != ["b@dest.test"]:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_the_listener_reconnects_after_losing_its_connection(store: Store) -> None:
    app = make_app(store)

    async def scenario() -> None:
        woken = Woken()
        listener = Listener(store, {channel("deliveries"): woken})
        stop = asyncio.Event()
        task = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.connected.wait(), 10)
        await woken.next()
        with store.write() as conn:  # as a database restart does to every session
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
                )
            )
        async with asyncio.timeout(20):
            while listener.connected.is_set():
                await asyncio.sleep(0.01)
        await woken.next(20)  # on losing it: look now, the others may have queued meanwhile
        await asyncio.wait_for(listener.connected.wait(), 20)
        woken.event.clear()
        await asyncio.to_thread(make_queued_message, store, app.app_id, ["c@dest.test"])
        await woken.next()
        stop.set()
        await task

    asyncio.run(scenario())
