"""Periodic duties that run once per period across every process and node: each task's turn is
a leased row in `worker_roles`, taken by whichever worker process finds it due first."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from postbode.runner.owner import worker_name
from postbode.runner.queue import wait_any
from postbode.store.engine import Store
from postbode.store.schema import utcnow, worker_roles

log = logging.getLogger(__name__)

RETRY_AFTER_FAILURE_SECONDS = 30.0  # a failed run is tried again this soon (or at its period)
MIN_LEASE_SECONDS = 60.0  # a run may take this long before another process may presume it dead
TICK_SECONDS = 1.0  # how often a worker looks for due tasks (one read of a small table)

TASK_RUNS = Counter(
    "postbode_task_runs_total",
    "Runs of periodic tasks in this process, by task and result.",
    ["task", "result"],
)


@dataclass(frozen=True)
class PeriodicTask:
    """A duty run every `every` seconds by one process of the whole installation.

    `run(store)` is a plain function (run in a thread: it may use the store freely) or a
    coroutine function. It should do a bounded amount of work per call (batches), since its lease is
    renewed while it runs but a process that dies mid-run leaves it to others only after the
    lease expires."""

    name: str
    every: float
    run: Callable[[Store], Any] | Callable[[Store], Awaitable[Any]]
    description: str
    lease: float = 0.0  # 0: max(MIN_LEASE_SECONDS, every)
    # first turn one period after the task first appears (not at once): for duties that
    # reach outside, which a fresh installation (or a test) should not set off at start
    delay_first: bool = False

    @property
    def lease_seconds(self) -> float:
        return self.lease or max(MIN_LEASE_SECONDS, self.every)


class PeriodicRunner:
    """Runs the due tasks of a list, each at most once per period across all processes."""

    def __init__(
        self,
        store: Store,
        tasks: list[PeriodicTask],
        *,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        tick: float = TICK_SECONDS,
    ) -> None:
        self.store = store
        self.tasks = {t.name: t for t in tasks}
        self.owner = owner or worker_name()
        self.clock = clock
        self.tick = min([tick, *(t.every for t in tasks)]) if tasks else tick
        self._running: dict[str, asyncio.Task[None]] = {}
        self.looks = 0  # how often it looked for due tasks (so tests can await a look)

    @property
    def busy(self) -> bool:
        """Whether a task of this process is running now."""
        return bool(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: look for due tasks every tick and run the ones this process takes.
        A store error while looking is logged and the next tick tries again."""
        if not self.tasks:
            await stop.wait()
            return
        try:
            await asyncio.to_thread(self._ensure_rows)
        except Exception:
            log.exception("periodic tasks: could not prepare their rows; trying as we go")
        try:
            while not stop.is_set():
                try:
                    due = await asyncio.to_thread(self._due)
                except Exception:
                    log.exception("periodic tasks: looking for due tasks failed")
                    due = []
                for name in due:
                    if name in self._running:
                        continue
                    task = self.tasks[name]
                    try:
                        taken = await asyncio.to_thread(self._take, task)
                    except Exception:
                        log.exception("periodic task %s: taking its turn failed", name)
                        continue
                    if taken:
                        self._running[name] = asyncio.create_task(self._run(task, stop))
                        self._running[name].add_done_callback(
                            lambda _, name=name: self._running.pop(name, None)  # type: ignore[misc]
                        )
                self.looks += 1
                await wait_any(stop, timeout=self.tick)
        finally:
            running = list(self._running.values())
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    # -- the turn: a leased row per task ------------------------------------------------------

    def _ensure_rows(self) -> None:
        insert = sqlite_insert if self.store.is_sqlite else pg_insert
        now = self.clock()
        with self.store.write() as conn:
            for task in self.tasks.values():
                first = now + timedelta(seconds=task.every if task.delay_first else 0)
                conn.execute(
                    insert(worker_roles)
                    .values(name=task.name, next_run_at=first, runs=0, failures=0)
                    .on_conflict_do_nothing(index_elements=["name"])
                )

    def _due(self) -> list[str]:
        """Tasks whose turn has come and that nobody holds (one read, no write lock)."""
        now = self.clock()
        t = worker_roles
        with self.store.read() as conn:
            rows = conn.execute(
                select(t.c.name, t.c.next_run_at, t.c.lease_until).where(
                    t.c.name.in_(list(self.tasks))
                )
            ).all()
        seen = {r.name for r in rows}
        due = [
            r.name
            for r in rows
            if (r.next_run_at is None or r.next_run_at <= now)
            and (r.lease_until is None or r.lease_until < now)
        ]
        if any(name not in seen for name in self.tasks):
            self._ensure_rows()  # a task new to this installation: its row, for the next tick
        return due

    def _take(self, task: PeriodicTask) -> bool:
        """Lease the task's turn to this process, if it is still due and free."""
        now = self.clock()
        t = worker_roles
        with self.store.write() as conn:
            result = conn.execute(
                update(t)
                .where(
                    t.c.name == task.name,
                    or_(t.c.next_run_at.is_(None), t.c.next_run_at <= now),
                    or_(t.c.lease_until.is_(None), t.c.lease_until < now),
                )
                .values(owner=self.owner, lease_until=now + timedelta(seconds=task.lease_seconds))
            )
            return result.rowcount == 1

    def _renew(self, task: PeriodicTask) -> None:
        t = worker_roles
        with self.store.write() as conn:
            conn.execute(
                update(t)
                .where(and_(t.c.name == task.name, t.c.owner == self.owner))
                .values(lease_until=self.clock() + timedelta(seconds=task.lease_seconds))
            )

    def _finish(self, task: PeriodicTask, started: datetime, error: str | None, ms: int) -> None:
        t = worker_roles
        wait = task.every if error is None else min(task.every, RETRY_AFTER_FAILURE_SECONDS)
        with self.store.write() as conn:
            conn.execute(
                update(t)
                .where(and_(t.c.name == task.name, t.c.owner == self.owner))
                .values(
                    owner=None,
                    lease_until=None,
                    last_run_at=started,
                    next_run_at=started + timedelta(seconds=wait),
                    last_error=error,
                    last_duration_ms=ms,
                    runs=t.c.runs + 1,
                    failures=t.c.failures + (1 if error else 0),
                )
            )

    # -- running one turn -------------------------------------------------------------------------

    async def _run(self, task: PeriodicTask, stop: asyncio.Event) -> None:
        started = self.clock()
        began = time.perf_counter()
        renewing = asyncio.create_task(self._renew_forever(task, stop))
        error: str | None = None
        try:
            if inspect.iscoroutinefunction(task.run):
                await task.run(self.store)
            else:
                await asyncio.to_thread(task.run, self.store)
            TASK_RUNS.labels(task.name, "ok").inc()
        except asyncio.CancelledError:
            error = "stopped before it finished"
            raise
        except Exception:
            log.exception("periodic task %s failed; trying again later", task.name)
            error = traceback.format_exc(limit=8)
            TASK_RUNS.labels(task.name, "failed").inc()
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            ms = int((time.perf_counter() - began) * 1000)
            try:
                await asyncio.shield(asyncio.to_thread(self._finish, task, started, error, ms))
            except Exception:  # its lease runs out and another turn comes
                log.exception("periodic task %s: recording its run failed", task.name)

    async def _renew_forever(self, task: PeriodicTask, stop: asyncio.Event) -> None:
        every = task.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self._renew, task)
            except Exception:
                log.exception("periodic task %s: renewing its lease failed", task.name)
