"""Periodic tasks on both dialects: once per period, across processes; failures and store
errors are logged and tried again; the turn is a leased row another process takes over."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode.runner.periodic import RETRY_AFTER_FAILURE_SECONDS, PeriodicRunner, PeriodicTask
from postbode.store.engine import Store
from postbode.store.schema import utcnow, worker_roles

from .test_queue import FlakyStore


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def settle(runner: PeriodicRunner) -> None:
    """Until the runner has looked twice more and runs nothing."""
    async with asyncio.timeout(30):
        seen = runner.looks
        while runner.looks < seen + 2 or runner.busy:
            await asyncio.sleep(0.005)


async def ticks(runner: PeriodicRunner, clock: Clock, steps: list[float]) -> None:
    """Run `runner`, moving the clock by each step and letting it finish what is due between."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    for step in steps:
        await settle(runner)
        clock.advance(step)
    await settle(runner)
    stop.set()
    await task


def row(store: Store, name: str) -> Any:
    with store.read() as conn:
        return conn.execute(select(worker_roles).where(worker_roles.c.name == name)).one()


def test_a_task_runs_once_per_period(store: Store) -> None:
    clock = Clock()
    runs: list[datetime] = []
    task = PeriodicTask("test.count", 60.0, lambda store: runs.append(clock()), "counts")
    runner = PeriodicRunner(store, [task], clock=clock, tick=0.02)
    # at 0: runs; +30 s: not due; +31 s (61 s): runs again; +59 s (120 s): not yet; +1: runs
    asyncio.run(ticks(runner, clock, [30, 31, 59, 1.5]))
    assert len(runs) == 3
    found = row(store, "test.count")
    assert (found.runs, found.failures, found.owner, found.lease_until) == (3, 0, None, None)
    assert found.last_error is None


def test_a_failing_task_is_logged_and_tried_again_sooner(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    calls: list[int] = []

    def flaky(store: Store) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first run breaks")

    task = PeriodicTask("test.flaky", 3600.0, flaky, "fails once")
    runner = PeriodicRunner(store, [task], clock=clock, tick=0.02)
    with caplog.at_level(logging.ERROR):
        asyncio.run(ticks(runner, clock, [RETRY_AFTER_FAILURE_SECONDS + 1]))
    assert len(calls) == 2  # again after the retry pause, not after an hour
    assert "periodic task test.flaky failed" in caplog.text
    found = row(store, "test.flaky")
    assert (found.runs, found.failures, found.last_error) == (2, 1, None)


def test_store_errors_while_looking_are_logged_and_the_task_still_runs(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    runs: list[int] = []
    flaky = FlakyStore(store)
    flaky.failures = 3  # creating the rows and the first attempts to take the turn fail
    task = PeriodicTask("test.after_errors", 60.0, lambda s: runs.append(1), "counts")
    runner = PeriodicRunner(flaky, [task], clock=clock, tick=0.02)
    with caplog.at_level(logging.ERROR):
        asyncio.run(ticks(runner, clock, [0, 0, 0]))
    assert runs == [1]
    assert flaky.failed == 3
    assert "failed" in caplog.text


def test_a_dead_owners_turn_is_taken_over_after_its_lease(store: Store) -> None:
    clock = Clock()
    runs: list[int] = []
    task = PeriodicTask("test.orphan", 60.0, lambda s: runs.append(1), "counts", lease=120.0)
    runner = PeriodicRunner(store, [task], clock=clock, tick=0.02)
    asyncio.run(ticks(runner, clock, []))  # creates the row and runs once
    with store.write() as conn:  # another process took the turn and died
        conn.execute(
            update(worker_roles)
            .where(worker_roles.c.name == "test.orphan")
            .values(owner="dead:1:x", lease_until=clock() + timedelta(seconds=120))
        )
    asyncio.run(ticks(runner, clock, [61, 30]))  # due, but leased to the dead one
    assert runs == [1]
    asyncio.run(ticks(runner, clock, [60]))  # the lease ran out
    assert runs == [1, 1]


CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from postbode.config import Settings
    from postbode.runner.periodic import PeriodicRunner, PeriodicTask
    from postbode.store.engine import create_store

    url, log_path, wanted, go_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = create_store(Settings(database_url=url))

    def work(store):
        started = time.time()
        time.sleep(0.05)
        with open(log_path, "a") as f:
            f.write(json.dumps([os.getpid(), started, time.time()]) + "\\n")

    def runs():
        try:
            with open(log_path) as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    async def main():
        open(f"{go_path}.{os.getpid()}", "w").close()  # ready: imported and connected
        while len(os.listdir(os.path.dirname(go_path))) < 3:  # both ready (and the log dir)
            await asyncio.sleep(0.01)
        stop = asyncio.Event()

        async def until_enough():
            while runs() < wanted:
                await asyncio.sleep(0.05)
            stop.set()

        watcher = asyncio.create_task(until_enough())
        task = PeriodicTask("test.once_across", 0.5, work, "appends a line")
        await PeriodicRunner(store, [task], tick=0.05).run(stop)
        await watcher

    asyncio.run(main())
    """
)


def test_two_processes_run_a_task_once_per_period(store: Store, tmp_path: Path) -> None:
    """Both processes compete for every turn until six runs happened between them: never two
    at once, never two in one period (however slowly a loaded machine starts them)."""
    url = store.engine.url.render_as_string(hide_password=False)
    log_path = tmp_path / "runs.jsonl"
    ready = tmp_path / "ready"
    ready.mkdir()
    (ready / "log").mkdir()  # counted with the two ready marks
    wanted = 6
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(log_path), str(wanted), str(ready / "go")],
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=240)
        assert child.returncode == 0, err.decode()
    runs = sorted(
        (json.loads(line) for line in log_path.read_text().splitlines()), key=lambda r: r[1]
    )
    for before, after in itertools.pairwise(runs):
        assert after[1] >= before[2], "two runs overlapped"
        assert after[1] - before[1] >= 0.5 - 0.1, "a period held two runs"
    # Each process stops once it sees six; a run that had already begun may add one or two.
    assert wanted <= len(runs) <= wanted + 2
