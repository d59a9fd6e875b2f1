"""Group writes: results handed in by many tasks are written by one call per batch, so a queue
busy with short items pays one transaction for many of them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# Writes a batch; None, or per item None (written) or the exception for its submitter.
Write = Callable[[list[T]], Sequence[BaseException | None] | None]


class BatchWriter(Generic[T]):
    """`await submit(item)` returns once `write` (run in a thread) has written a batch holding
    the item; everything submitted while a write runs goes into the next one.

    `write` returns None when it wrote every item, or one entry per item: None where written,
    the exception that item's submitter should get where not. If `write` raises, every
    submitter of that batch gets the exception."""

    def __init__(self, write: Write[T], max_batch: int = 500) -> None:
        self._write = write
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._drain_pending())
        await done

    async def flush(self) -> None:
        """Until everything submitted so far is written."""
        while self._drain is not None and not self._drain.done():
            await asyncio.shield(self._drain)

    async def _drain_pending(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            errors: Sequence[BaseException | None] | None
            try:
                errors = await asyncio.to_thread(self._write, [item for item, _ in batch])
            except Exception as exc:
                errors = [exc] * len(batch)
            for i, (_, done) in enumerate(batch):
                error = errors[i] if errors is not None else None
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
