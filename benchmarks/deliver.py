"""Benchmark: the delivery worker's CPU per message, alone. N messages are queued straight into
a fresh SQLite store (DKIM key, 2 KB, one recipient each, as relay.py sends them), then one
in-process delivery worker drains them to relay.py's sink; the figure is the worker process's
CPU time (every thread, user + system) from its first claim to the last outcome recorded, per
message.

Unlike relay.py, nothing else runs in the process being measured (no accept, no serve), so the
figure moves less with the machine's load; `--claim` sets the deliveries per claim (relay.py's
C=10 gives claims of 12-40, fewer on a busy machine; C=50 of about 52)."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.delivery.worker import DeliveryWorker
from postbode.store.engine import Store, create_store
from postbode.store.schema import apps, deliveries
from postbode.testing.factories import queue_mail

# relay.py's messages and sink; imported after Postbode, which comes from the environment (a
# PYTHONPATH may name another tree to compare), while relay.py puts this tree's src first.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import make_messages, run, run_sink


def seed(store: Store, app_id: int, n: int, size: int) -> None:
    queue_mail(store, app_id, make_messages(n, size), source="smtp")


async def drain(settings: Settings, store: Store, n: int) -> tuple[float, float, float]:
    """(user and system CPU seconds, wall seconds) for the worker to record n delivered outcomes."""
    worker = DeliveryWorker(settings, store)  # before the clock: serve starts its workers early
    stop = asyncio.Event()
    t0, wall0 = os.times(), time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    delivered = select(func.count()).where(deliveries.c.status == "delivered")
    while True:
        await asyncio.sleep(0.2)
        with store.read() as conn:
            if conn.execute(delivered).scalar_one() >= n:
                break
    t1, wall = os.times(), time.perf_counter() - wall0
    user, system = t1.user - t0.user, t1.system - t0.system
    stop.set()
    await task
    return user, system, wall


def one_run(args: argparse.Namespace, sink_port: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="postbode-bench-deliver-") as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            transport_map=f"dest.test=127.0.0.1:{sink_port}",
            dns_nameservers="127.0.0.1:9",
            smtp_hostname="mta.bench.test",
            secret_key="bench-secret-key",
            delivery_batch_size=args.claim,
            delivery_concurrency=args.concurrency,
        )
        store = create_store(settings)
        app = tenancy.create_app(store, "bench")
        tenancy.add_domain(store, "bench", "shop.test")
        with store.read() as conn:
            app_id = conn.execute(select(apps.c.id).where(apps.c.name == app.name)).scalar_one()
        seed(store, app_id, args.n, args.size)
        try:
            return run(drain(settings, store, args.n))  # type: ignore[no-any-return]
        finally:
            store.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=3000, help="messages per run (default 3000)")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes")
    ap.add_argument("--claim", type=int, default=30, help="deliveries per claim (default 30)")
    ap.add_argument(
        "--concurrency", type=int, default=100, help="deliveries in hand at once (default 100)"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    count: Any = ctx.Value("i", 0)
    stop = ctx.Event()
    sink = ctx.Process(target=run_sink, args=(ready, results, count, stop), daemon=True)
    sink.start()
    port = ready.get(timeout=30)
    per_message = []
    try:
        for run in range(args.runs):
            user, system, wall = one_run(args, port)
            per_message.append((user + system) / args.n * 1000)
            print(
                f"run {run + 1}: {args.n} messages in {wall:.1f} s, worker CPU "
                f"{per_message[-1]:.3f} ms per message ({user / args.n * 1000:.3f} user, "
                f"{system / args.n * 1000:.3f} system; claims of {args.claim}; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
                flush=True,
            )
    finally:
        stop.set()
        sink.join(timeout=10)
        if sink.is_alive():
            sink.kill()
    print(
        f"worker CPU per message: median {statistics.median(per_message):.3f} ms "
        f"(min {min(per_message):.3f}, max {max(per_message):.3f})"
    )


if __name__ == "__main__":
    main()
