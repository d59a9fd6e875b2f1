"""Benchmark: the message log and dashboard queries over a million seeded messages on SQLite;
prints p50/p95 per query (the seeded store is cached under /tmp between runs)."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import func, select, text

from postbode import demo
from postbode.config import Settings
from postbode.stats import queries, rollup
from postbode.store.engine import Store, create_store
from postbode.store.migrate import head_revision
from postbode.store.schema import apps, deliveries
from postbode.web.api.messages import list_messages
from postbode.web.ui.search import MessageQuery, search

CACHE = Path(tempfile.gettempdir()) / "postbode-bench-ui"


def seeded_store(messages: int, fresh: bool) -> tuple[Store, dict[str, Any]]:
    """The cached seeded store (seeded now when missing: into a scratch directory that is
    renamed when done, so a half-seeded store is never reused)."""
    data_dir = CACHE / f"sqlite-{messages}"
    marker = data_dir / "seeded.json"
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    if not marker.exists():
        scratch = CACHE / f"seeding-{messages}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        store = create_store(Settings(data_dir=scratch))
        cpu = time.process_time()
        done = [0]

        def progress(count: int) -> None:
            done[0] += count
            if done[0] % 100_000 < count:
                print(f"  seeded {done[0]:>9,} messages", flush=True)

        report = demo.seed(store, messages=messages, rng=random.Random(2026), progress=progress)
        cpu = time.process_time() - cpu
        store.dispose()
        size = sum(f.stat().st_size for f in scratch.iterdir())
        info = {
            **report.as_json(),
            "cpu_seconds": round(cpu, 1),
            "bytes": size,
            "seeded_at": time.time(),
        }
        (scratch / "seeded.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(data_dir, ignore_errors=True)
        scratch.rename(data_dir)
    info = json.loads(marker.read_text())
    behind = current_revision_of(data_dir) != head_revision()
    started = time.perf_counter()
    store = create_store(Settings(data_dir=data_dir))  # migrates a store seeded on an old schema
    info["migrate_seconds"] = round(time.perf_counter() - started, 1) if behind else None
    return store, info


def current_revision_of(data_dir: Path) -> str | None:
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{data_dir / 'postbode.db'}")
    try:
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, float, Any]:
    """Wall-clock p50 and p95 and CPU-time p50 in milliseconds over `runs` calls after one
    warm-up, and the last result. CPU time is this process's (SQLite runs in it): on a
    loaded machine it is the steadier figure."""
    result = fn()
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    wall.sort()
    p95 = wall[min(len(wall) - 1, round(0.95 * (len(wall) - 1)))]
    return statistics.median(wall), p95, statistics.median(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fresh", action="store_true", help="seed again even if cached")
    args = parser.parse_args()

    store, info = seeded_store(args.messages, args.fresh)
    print(
        f"store: {info['messages']:,} messages, {info['deliveries']:,} deliveries, "
        f"{info['events']:,} events, {info['attempts']:,} attempts, "
        f"{info['bytes'] / 2**20:,.0f} MiB; seeded in {info['seconds']:,.0f} s "
        f"({info['cpu_seconds']:,.0f} s CPU)"
    )
    if info.get("migrate_seconds") is not None:
        print(f"migration to {head_revision()} on this store: {info['migrate_seconds']} s")
    started, started_cpu = time.perf_counter(), time.process_time()
    merged = rollup.compact(store)  # as the periodic duty would (a store seeded before it)
    if merged:
        print(
            f"counter compaction: {merged:,} minute rows merged into hour rows in "
            f"{time.perf_counter() - started:.1f} s ({time.process_time() - started_cpu:.1f} s CPU)"
        )
    with store.read() as conn:
        app_id = conn.execute(select(apps.c.id).where(apps.c.name == "demo")).scalar_one()
        # A recipient with a handful of messages, and one with a single message.
        busy = conn.execute(
            text(
                "SELECT recipient FROM deliveries WHERE app_id = :a AND recipient LIKE 'user2%' "
                "GROUP BY recipient HAVING count(*) BETWEEN 3 AND 10 LIMIT 1"
            ),
            {"a": app_id},
        ).scalar_one()
        rare = conn.execute(
            select(deliveries.c.recipient)
            .where(deliveries.c.app_id == app_id)
            .group_by(deliveries.c.recipient)
            .having(func.count() == 1)
            .limit(1)
        ).scalar_one()
        stats = conn.execute(text("SELECT count(*) FROM stat_counters")).scalar_one()
    print(f"stat_counters rows: {stats:,}")
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(store=store)))

    def api(**filters: Any) -> Callable[[], Any]:
        """GET /api/v1/messages as its route runs it (the query is not factored out)."""

        def call() -> Any:
            return list_messages(request, app_id, **filters)

        return call

    def ui(**filters: Any) -> Callable[[], Any]:
        """The web UI's message log (web/ui/search.py)."""

        def call() -> Any:
            with store.read() as conn:
                return search(conn, MessageQuery((app_id,), **filters))

        return call

    first = list_messages(request, app_id)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("API log, first page (50)", api()),
        ("API log, next page", api(cursor=first["next_cursor"])),
        ("API log, recipient (a few messages)", api(recipient=busy.upper())),
        ("API log, recipient (one message)", api(recipient=rare)),
        ("API log, status = bounced", api(status="bounced")),
        ("API log, status = deferred (rare)", api(status="deferred")),
        ("API log, tag = invoice", api(tag="invoice")),
        ("UI log, first page (50)", ui()),
        ("UI log, recipient (a few messages)", ui(recipient=busy.upper())),
        ("UI log, recipient (one message)", ui(recipient=rare)),
        ("UI log, recipient (no such address)", ui(recipient="nobody@nowhere.test")),
        ("UI log, status = bounced", ui(status="bounced")),
        ("UI log, status = deferred (rare)", ui(status="deferred")),
        ("UI log, tag = invoice", ui(tag="invoice")),
        ("UI log, subject contains", ui(subject="password")),
        ("UI log, subject absent (scan window)", ui(subject="no such words")),
        ("UI log, sender contains", ui(sender="billing@")),
    ]
    for name in ("24h", "7d", "30d"):
        cases.append(
            (
                f"stats series + summary {name}",
                lambda n=name: queries.series_and_summary(store, [app_id], n),
            )
        )
    for name in ("24h", "7d", "30d"):
        cases.append(
            (f"dashboard (all of it) {name}", lambda n=name: queries.dashboard(store, [app_id], n))
        )
    cases += [
        ("top tags 30d", lambda: queries.top_tags(store, [app_id], "30d")),
        ("top bounce reasons 30d", lambda: queries.top_bounce_reasons(store, [app_id], "30d")),
        ("queue now", lambda: queries.queue_now(store, [app_id])),
        (
            "compare two tags 30d",
            lambda: queries.compare(store, [app_id], "welcome", "password-reset", "30d"),
        ),
    ]
    load = os.getloadavg()[0]
    print(f"\nload average at start: {load:.1f} on {os.cpu_count()} cores")
    print(f"{'query':<40} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8}  rows")
    for name, fn in cases:
        p50, p95, cpu, result = timed(fn, args.runs)
        if isinstance(result, dict) and "data" in result:
            rows: Any = len(result["data"])
        else:
            rows = len(result.rows) if hasattr(result, "rows") else ""
        print(f"{name:<40} {p50:8.1f} {p95:8.1f} {cpu:8.1f}  {rows}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:,.0f} MiB")
    store.dispose()


if __name__ == "__main__":
    main()
