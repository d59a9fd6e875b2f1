"""Benchmark: the message log, recipient search, status and tag filters, reply text, time ranges
and the dashboard on a store seeded by benchmarks/seed_scale.py (10,000,000 deliveries on
PostgreSQL, 1,000,000 on SQLite); prints p50/p95 per query shape, and the plan of the slowest
statement of each shape whose p95 is over --explain-over ms (EXPLAIN ANALYZE on PostgreSQL,
EXPLAIN QUERY PLAN on SQLite).

    nice python benchmarks/search_scale.py --url postgresql://postgres@127.0.0.1/pb_scale
    nice python benchmarks/search_scale.py --url sqlite:////tmp/pb-scale/postbode.db --walk

`--walk` also takes the operator's minute in headless Chromium (postbode.testing.operator_walk:
dashboard, click the dip, the filtered log, a bounced message and its reply) against the app
served by uvicorn over the same store, and prints each page's server time (Server-Timing).

`--before` runs the same shapes the way they ran before migrations 0019 and 0020, on the same
store, for a comparison under the same load: the log's state, category and reply filters
probing the window's messages one by one (no walk on the deliveries), the API's reply filter
unbounded, and the top bounce reasons read from the window's delivery.bounced events."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import event, select, text

from postbode import tenancy
from postbode.config import Settings
from postbode.stats import queries
from postbode.store.engine import Store, create_store
from postbode.store.schema import apps, deliveries, messages, utcnow
from postbode.testing.scale_seed import DIP_TAG
from postbode.web.api import messages as api_messages
from postbode.web.api.messages import list_messages, load_message
from postbode.web.ui import search as log_search
from postbode.web.ui.search import MessageQuery, count_matches, search

WALK_USER = "walk@scale.test"
WALK_PASSWORD = "operator minute at scale"


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[
        min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))
    ]


class Statements:
    """The SQL statements a call ran, with their durations (for EXPLAIN)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.on = False
        self.seen: list[tuple[float, str, Any]] = []
        engine = store.engine

        @event.listens_for(engine, "before_cursor_execute")
        def before(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            conn.info["started"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            if self.on and not statement.lstrip().upper().startswith(("EXPLAIN", "BEGIN")):
                self.seen.append((time.perf_counter() - conn.info["started"], statement, params))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[float, str, Any]]]:
        self.seen = []
        self.on = True
        try:
            yield self.seen
        finally:
            self.on = False

    def explain_slowest(self, fn: Callable[[], Any]) -> str:
        with self.recording() as seen:
            fn()
        if not seen:
            return "(no statement)"
        took, statement, params = max(seen, key=lambda s: s[0])
        prefix = (
            "EXPLAIN (ANALYZE, BUFFERS) " if not self.store.is_sqlite else "EXPLAIN QUERY PLAN "
        )
        with self.store.engine.connect() as conn:
            rows = conn.exec_driver_sql(prefix + statement, params).all()
        plan = "\n".join(
            "    " + (str(r[0]) if not self.store.is_sqlite else f"{r[1]:>4} {r[3]}") for r in rows
        )
        sql = " ".join(statement.split())[:600]
        return f"  slowest statement ({took * 1000:.1f} ms of {len(seen)}):\n    {sql}\n{plan}"


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    result = fn()  # warm-up
    wall = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        wall.append((time.perf_counter() - started) * 1000)
    p50, p95 = percentiles(wall)
    return p50, p95, result


def cases(store: Store) -> list[tuple[str, Callable[[], Any]]]:
    now = utcnow()
    with store.read() as conn:
        app_ids = {str(n): int(i) for i, n in conn.execute(select(apps.c.id, apps.c.name))}
        everyone = tuple(sorted(app_ids.values()))
        shop = app_ids["shop"]
        # user0 … get the most mail (the seeder's skew); a rare one from the middle.
        busy = conn.execute(
            select(deliveries.c.recipient)
            .where(deliveries.c.app_id == shop, deliveries.c.recipient.like("user0@%"))
            .limit(1)
        ).scalar_one()
        rare = conn.execute(
            select(deliveries.c.recipient)
            .where(deliveries.c.app_id == shop)
            .order_by(deliveries.c.id.desc())
            .offset(5000)
            .limit(1)
        ).scalar_one()
        bounced_message = conn.execute(
            select(deliveries.c.message_id)
            .where(deliveries.c.app_id == shop, deliveries.c.status.concat("") == "bounced")
            .order_by(deliveries.c.id.desc())
            .limit(1)
        ).scalar_one()
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    week_ago = now - timedelta(days=7)
    request: Any = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(store=store)))

    def ui(apps_: tuple[int, ...] = everyone, **filters: Any) -> Callable[[], Any]:
        """The UI's log page: a page and the bounded match count, as the route runs them."""

        def call() -> Any:
            q = MessageQuery(apps_, **filters)
            with store.read() as conn:
                return search(conn, q), count_matches(conn, q)

        return call

    def api(**filters: Any) -> Callable[[], Any]:
        return lambda: list_messages(request, shop, **filters)

    found: list[tuple[str, Callable[[], Any]]] = [
        ("UI log, default page (all apps)", ui()),
        ("UI log, default page (shop)", ui((shop,))),
        ("UI log, recipient, busy address", ui(recipient=busy.upper())),
        ("UI log, recipient, rare address", ui(recipient=rare)),
        ("UI log, recipient, no such address", ui(recipient="nobody@nowhere.test")),
        ("UI log, status bounced", ui(status="bounced")),
        ("UI log, status bounced + tag", ui(status="bounced", tag="password-reset")),
        ("UI log, status deferred + tag (rare)", ui(status="deferred", tag="invoice")),
        ("UI log, reply text (spamhaus)", ui(reply="spamhaus")),
        ("UI log, category user_unknown", ui(category="user_unknown")),
        ("UI log, category blocked + tag", ui(category="blocked", tag=DIP_TAG)),
        ("UI log, reply text (spamhaus), shop", ui((shop,), reply="spamhaus")),
        (
            "UI log, tag + the dip's hour",
            ui(tag=DIP_TAG, since=hour, until=hour + timedelta(hours=1)),
        ),
        ("UI log, one hour a week ago", ui(since=week_ago, until=week_ago + timedelta(hours=1))),
        ("UI log, subject contains", ui(subject="password")),
        ("API log, first page", api()),
        ("API log, recipient (busy)", api(recipient=busy)),
        ("API log, status bounced", api(status="bounced")),
        ("API log, status bounced + tag", api(status="bounced", tag="password-reset")),
        (
            "API log, tag + week-old hour",
            api(tag="invoice", since=week_ago, until=week_ago + timedelta(hours=1)),
        ),
        ("API log, reply text (spamhaus)", api(reply="spamhaus")),
        ("API log, category user_unknown", api(category="user_unknown")),
        ("message page data (bounced)", lambda: _load(store, shop, bounced_message)),
    ]
    for name in ("24h", "7d", "30d"):
        found.append(
            (
                f"dashboard {name} (all apps)",
                lambda n=name: queries.dashboard(store, list(everyone), n),
            )
        )
    found += [
        ("dashboard 30d (shop)", lambda: queries.dashboard(store, [shop], "30d")),
        (
            "stats series + summary 7d, one tag",
            lambda: queries.series_and_summary(store, [shop], "7d", tag="password-reset"),
        ),
        (
            "top bounce reasons 30d",
            lambda: queries.top_bounce_reasons(store, list(everyone), "30d"),
        ),
        ("queue now", lambda: queries.queue_now(store, list(everyone))),
    ]
    return found


def _load(store: Store, app_id: int, message_id: Any) -> Any:
    with store.read() as conn:
        return load_message(conn, app_id, message_id)


def operator_walks(store: Store, url: str, runs: int) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from postbode.testing.operator_walk import walk
    from postbode.web.app import create_app

    with store.read() as conn:
        known = conn.execute(text("SELECT 1 FROM users WHERE email = :e"), {"e": WALK_USER}).first()
    if known is None:
        tenancy.create_user(store, WALK_USER, WALK_PASSWORD, admin=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(database_url=url, secret_key="scale-benchmark")
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, store), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    while not server.started:
        time.sleep(0.05)
    times: dict[str, list[float]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/login")
            page.fill("input[name=email]", WALK_USER)
            page.fill("input[name=password]", WALK_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/dashboard")
            for i in range(runs + 1):
                steps = walk(page, base, DIP_TAG, "blocked using")
                if i == 0:
                    for s in steps:
                        print(f"  {s.name:<16} {s.url}")
                    continue  # the first walk warms the caches
                for s in steps:
                    times.setdefault(s.name, []).append(s.server_ms or 0.0)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"\noperator's minute, {runs} walks, server time per page (Server-Timing):")
    print(f"{'page':<18} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, samples in times.items():
        p50, p95 = percentiles(samples)
        print(f"{name:<18} {p50:8.1f} {p95:8.1f} {max(samples):8.1f}")


def reasons_from_events(
    store: Store,
    app_ids: Any,
    range: str | None = None,
    *,
    since: Any = None,
    until: Any = None,
    tag: str | None = None,
    stream: str | None = None,
    limit: int = 10,
    now: Any = None,
) -> list[queries.BounceReason]:
    """The top bounce reasons as they were read before bounce_counters (migration 0019): the
    window's delivery.bounced events and their JSON (not narrowed by tag or stream here)."""
    from sqlalchemy import func

    from postbode.store.schema import events

    win = queries.window(range, since=since, until=until, now=now)
    category = func.coalesce(events.c.data["category"].as_string(), "unknown")
    hard = events.c.data["hard"].as_boolean()
    with store.read() as conn:
        ids = (
            list(app_ids)
            if app_ids is not None
            else list(conn.execute(select(apps.c.id)).scalars())
        )
        rows = conn.execute(
            select(category.label("category"), hard.label("hard"), func.count().label("n"))
            .where(
                events.c.app_id.in_(ids),
                events.c.type == "delivery.bounced",
                events.c.created_at >= win.since,
                events.c.created_at < win.until,
            )
            .group_by("category", "hard")
        ).all()
    return queries.bounce_reasons_of(
        [(str(r.category), bool(r.hard), int(r.n)) for r in rows], limit
    )


def as_before() -> None:
    """The shapes as they ran before migrations 0019 and 0020 (see --before)."""
    log_search._driver = lambda q: None  # type: ignore[assignment]  # messages probed
    api_messages.SCAN_WINDOW = 1 << 62  # the API's reply filter unbounded
    queries.top_bounce_reasons = reasons_from_events  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", help="the query shapes whose name contains this")
    parser.add_argument("--explain-over", type=float, default=100.0, help="ms (p95)")
    parser.add_argument("--walk", type=int, nargs="?", const=10, default=0, help="walks (10)")
    parser.add_argument("--no-queries", action="store_true")
    parser.add_argument("--before", action="store_true", help="as before 0019 and 0020")
    args = parser.parse_args()
    if args.before:
        as_before()

    started = time.perf_counter()
    store = create_store(Settings(database_url=args.url), migrate=True)
    print(f"store opened (and migrated) in {time.perf_counter() - started:.1f} s")
    with store.read() as conn:
        n_messages = conn.execute(select(text("count(*)")).select_from(messages)).scalar_one()
        n_deliveries = conn.execute(select(text("count(*)")).select_from(deliveries)).scalar_one()
    print(
        f"{store.dialect}: {n_messages:,} messages, {n_deliveries:,} deliveries; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        f"{' (as before 0019 and 0020)' if args.before else ''}"
    )
    if not args.no_queries:
        statements = Statements(store)
        slow: list[tuple[str, Callable[[], Any]]] = []
        print(f"\n{'query':<42} {'p50 ms':>8} {'p95 ms':>8}  rows")
        for name, fn in cases(store):
            if args.only and args.only not in name:
                continue
            p50, p95, result = timed(fn, args.runs)
            rows = ""
            if isinstance(result, tuple) and hasattr(result[0], "rows"):
                count = result[1][0]
                rows = f"{len(result[0].rows)} (count {count}{'+' if count > 1000 else ''})"
            elif isinstance(result, dict) and "data" in result:
                rows = str(len(result["data"]))
            load = os.getloadavg()[0]
            print(f"{name:<42} {p50:8.1f} {p95:8.1f}  {rows}  (load {load:.1f})", flush=True)
            if p95 > args.explain_over:
                slow.append((name, fn))
        for name, fn in slow:
            print(f"\n{name}:")
            print(statements.explain_slowest(fn))
    if args.walk:
        operator_walks(store, args.url, args.walk)
    store.dispose()


if __name__ == "__main__":
    main()
