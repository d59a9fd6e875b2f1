"""The registry: every queue runner and periodic task a worker process runs, by name, so that
one list starts them and `postbode worker --list` shows them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from postbode.runner.periodic import PeriodicTask
from postbode.store.engine import Store


class Runnable(Protocol):
    """A queue's loop in one process."""

    def notify(self) -> None:
        """Work was queued: look now (called on the loop `run` runs on)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Drain the queue until `stop` is set, then finish or hand back what is in hand."""


@dataclass(frozen=True)
class RunnerSpec:
    """A queue and how to start its runner in a process."""

    table: str  # the queue's table; also names its wake-up channel
    description: str
    make: Callable[[Store], Runnable]


@dataclass
class Registry:
    runners: list[RunnerSpec] = field(default_factory=list)
    tasks: list[PeriodicTask] = field(default_factory=list)

    def add_runner(self, spec: RunnerSpec) -> None:
        if any(r.table == spec.table for r in self.runners):
            raise ValueError(f"a runner for {spec.table} is registered twice")
        self.runners.append(spec)

    def add_task(self, task: PeriodicTask) -> None:
        if any(t.name == task.name for t in self.tasks):
            raise ValueError(f"periodic task {task.name} is registered twice")
        self.tasks.append(task)

    def describe(self) -> list[dict[str, str]]:
        """One entry per runner and task: kind, name, schedule, what it does."""
        return [
            *(
                {"kind": "queue", "name": r.table, "every": "when woken", "does": r.description}
                for r in self.runners
            ),
            *(
                {"kind": "task", "name": t.name, "every": _seconds(t.every), "does": t.description}
                for t in self.tasks
            ),
        ]


def _seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g} {unit}"
    return f"{value:g} s"
