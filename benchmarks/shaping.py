"""What shared shaping costs: the store transactions a worker makes to book rate slots for a
batch, and to take and give back a connection slot, on SQLite and PostgreSQL, from one thread
and from several at once (contending for one destination). Prints figures.

    python benchmarks/shaping.py [--dialect sqlite|postgresql|both] [--seconds 3] [--threads 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from postbode.config import Settings
from postbode.delivery.destinations import StoreState
from postbode.delivery.shaping import Limits, Shaper, parse_rules
from postbode.store.engine import Store, create_store
from postbode.testing.pg import scratch_database

PG_ADMIN = os.environ.get(
    "POSTBODE_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BATCH = 50  # deliveries booked per admit (one connection's worth)


@contextmanager
def database(dialect: str, scratch: Path) -> Iterator[Store]:
    if dialect == "sqlite":
        store = create_store(Settings(data_dir=scratch), migrate=True)
        try:
            yield store
        finally:
            store.dispose()
        return
    with scratch_database(PG_ADMIN, "postbode_bench") as url:
        store = create_store(Settings(database_url=url), migrate=True)
        try:
            yield store
        finally:
            store.dispose()


def shaper(store: Store, holder: str) -> Shaper:
    # A rate high enough that every booking goes at once: the cost measured is the store's.
    return Shaper(
        parse_rules("dest.test=conn:1000,rate:100000000,burst:1000000"),
        Limits(1000, 0),
        state=StoreState(store),
        holder=holder,
        max_wait=5.0,
    )


def rate(store: Store, seconds: float, threads: int) -> float:
    """Admits (batches of BATCH) per second over all threads."""
    return _run(threads, seconds, lambda i: _admit_loop(shaper(store, f"t{i}")))


def _admit_loop(s: Shaper) -> Callable[[], None]:
    keys = list(range(BATCH))
    return lambda: s.admit("dest.test", keys) and None


def connections(store: Store, seconds: float, threads: int) -> float:
    """Connection slots taken and given back per second over all threads."""

    def make(i: int) -> Callable[[], None]:
        s = shaper(store, f"t{i}")
        loop = asyncio.new_event_loop()

        async def once() -> None:
            assert await s.acquire_connection("dest.test", "mx1.dest.test")
            await s.release_connection("mx1.dest.test")

        return lambda: loop.run_until_complete(once())

    return _run(threads, seconds, make)


def _run(threads: int, seconds: float, make: Callable[[int], Callable[[], None]]) -> float:
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        step = make(i)
        start.wait()
        while time.monotonic() < stop_at[0]:
            step()
            counts[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for t in pool:
        t.join()
    return sum(counts) / (time.monotonic() - began)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dialect", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    dialects = ["sqlite", "postgresql"] if args.dialect == "both" else [args.dialect]
    print(f"batch of {BATCH} deliveries per admit; {args.seconds:g} s per figure")
    for dialect in dialects:
        with tempfile.TemporaryDirectory() as tmp, database(dialect, Path(tmp)) as store:
            for threads in (1, args.threads):
                admits = rate(store, args.seconds, threads)
                slots = connections(store, args.seconds, threads)
                print(
                    f"{dialect:10} {threads} thread(s): {admits:7.0f} admits/s "
                    f"({admits * BATCH:8.0f} deliveries booked/s), "
                    f"{slots:6.0f} connection slots taken and freed/s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
