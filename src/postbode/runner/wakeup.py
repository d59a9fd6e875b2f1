"""Wake-ups across processes and nodes: on PostgreSQL, idle runners LISTEN on their queue's
channel, which the store's triggers NOTIFY when a commit queues work; polling is the fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import psycopg
from sqlalchemy.engine import make_url

from postbode.runner.queue import wait_any
from postbode.store.engine import Store

log = logging.getLogger(__name__)

RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)  # waits between tries after losing the connection
CHECK_STOP_SECONDS = 1.0


def channel(table: str) -> str:
    """The NOTIFY channel of a queue table (as the triggers of migration 0003 name it)."""
    return f"postbode_{table}"


class Listener:
    """One connection per process LISTENing on the channels given, calling each channel's
    callback when a notification arrives (on the loop `run` runs on).

    After the connection is lost (the database restarted, a network hiccup) it reconnects
    with growing pauses and then calls every callback once: work may have been queued while
    nobody listened."""

    def __init__(self, store: Store, callbacks: Mapping[str, Callable[[], None]]) -> None:
        url = make_url(store.engine.url.render_as_string(hide_password=False))
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.callbacks = dict(callbacks)
        self.connected = asyncio.Event()  # set while listening (for tests and health)

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._listen(stop)
                failures = 0
            except (psycopg.Error, OSError) as exc:
                self.connected.clear()
                pause = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
                failures += 1
                log.warning("listening for queued work failed (%s); again in %g s", exc, pause)
                await wait_any(stop, timeout=pause)
                if failures == 1:
                    self._wake_all()  # meanwhile the runners poll; look at once when back

    async def _listen(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=5
        ) as conn:
            for name in self.callbacks:
                await conn.execute(f'LISTEN "{name}"')
            self.connected.set()
            self._wake_all()  # anything queued before we listened
            while not stop.is_set():
                async for note in conn.notifies(timeout=CHECK_STOP_SECONDS):
                    callback = self.callbacks.get(note.channel)
                    if callback is not None:
                        callback()
        self.connected.clear()

    def _wake_all(self) -> None:
        for callback in self.callbacks.values():
            callback()
