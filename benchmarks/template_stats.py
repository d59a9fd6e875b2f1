"""Benchmark: the per-template figures (stats.queries.template_stats, as the dashboard and the
Templates page read them from the counters' template dimension) over seeded messages on
SQLite, with a share of them made from templates, the counters compacted as the periodic duty
does; prints p50/p95 per range next to the rest of the dashboard (stats.queries.dashboard).

    python benchmarks/template_stats.py [--messages 200000] [--templated 0.5] [--runs 7]
                                        [--no-compact]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from postbode import tenancy
from postbode.config import Settings
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.stats import queries, rollup
from postbode.store.engine import Store, create_store
from postbode.store.schema import messages, utcnow

TEMPLATES = ("welcome", "password-reset", "order-confirmation", "invoice", "shipping-update")
CHUNK = 5_000


def seed(store: Store, app_id: int, count: int, templated: float, rng: random.Random) -> int:
    """`count` messages over the last 30 days, `templated` of them from a template, each with
    received, queued, delivered (or bounced) and for some an open: returns the events."""
    now = utcnow()
    written = 0
    for start in range(0, count, CHUNK):
        rows, batch = [], []
        for _ in range(min(CHUNK, count - start)):
            at = now - timedelta(seconds=rng.randint(0, 30 * 86400))
            message_id = uuid.uuid4()
            alias = rng.choice(TEMPLATES) if rng.random() < templated else None
            rows.append(
                {
                    "id": message_id,
                    "app_id": app_id,
                    "source": "api",
                    "message_id_header": f"<{message_id}@bench.test>",
                    "mail_from": "orders@shop.test",
                    "size": 2000,
                    "received_at": at,
                    "template": alias,
                    "template_version": 1 if alias else None,
                }
            )
            # as the recorders write them: each event carries its message's template
            common = {"app_id": app_id, "message_id": message_id, "template": alias, "at": at}
            batch += [
                Event(type=EventType.MESSAGE_RECEIVED, **common),  # type: ignore[arg-type]
                Event(type=EventType.DELIVERY_QUEUED, **common),  # type: ignore[arg-type]
            ]
            ended = (
                EventType.DELIVERY_BOUNCED if rng.random() < 0.02 else EventType.DELIVERY_DELIVERED
            )
            batch.append(Event(type=ended, **common))  # type: ignore[arg-type]
            if ended == EventType.DELIVERY_DELIVERED and rng.random() < 0.4:
                later = {**common, "at": at + timedelta(minutes=rng.randint(1, 600))}
                batch.append(Event(type=EventType.MESSAGE_OPENED, **later))  # type: ignore[arg-type]
        with store.write() as conn:
            conn.execute(insert(messages), rows)
            record(conn, batch)
        written += len(batch)
    return written


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()  # warm the page cache and the statement cache
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--templated", type=float, default=0.5, help="share made from templates")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--no-compact", action="store_true", help="leave every minute's counter rows as written"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = create_store(Settings(data_dir=Path(scratch)))
        app = tenancy.create_app(store, "shop")
        quiet = tenancy.create_app(store, "quiet")  # never sends from a template
        started = time.perf_counter()
        events = seed(store, app.app_id, args.messages, args.templated, random.Random(2026))
        seed(store, quiet.app_id, args.messages // 10, 0.0, random.Random(7))
        # The counters as the periodic compaction leaves them (stats/rollup.py).
        if not args.no_compact:
            rollup.compact(store)
        print(
            f"seeded {args.messages:,} messages ({args.templated:.0%} from templates), "
            f"{events:,} events, in {time.perf_counter() - started:.0f} s "
            f"(counters {'as written' if args.no_compact else 'compacted'})"
        )
        made = sum(t.sent for t in queries.template_stats(store, [app.app_id], "30d"))
        print(f"sent from templates over 30d, as counted: {made:,}")
        print("| query | p50 ms | p95 ms |")
        print("|---|---|---|")
        for name in ("24h", "7d", "30d"):
            p50, p95 = timed(
                lambda n=name: queries.template_stats(store, [app.app_id], n), args.runs
            )
            print(f"| template_stats {name} | {p50:.1f} | {p95:.1f} |")
        for name in ("24h", "7d", "30d"):
            p50, p95 = timed(lambda n=name: queries.dashboard(store, [app.app_id], n), args.runs)
            print(f"| the rest of the dashboard {name} | {p50:.1f} | {p95:.1f} |")
        p50, p95 = timed(lambda: queries.template_stats(store, [quiet.app_id], "30d"), args.runs)
        print(f"| template_stats 30d, an app without templates | {p50:.2f} | {p95:.2f} |")
        store.dispose()


if __name__ == "__main__":
    main()
