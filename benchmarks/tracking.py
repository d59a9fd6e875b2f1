"""Benchmark: click redirects per second from a real `postbode web`, and webhook deliveries per
second to a loopback receiver; prints the figures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.util
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from postbode.config import Settings
from postbode.endpoints.destinations import DestinationPolicy
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store, create_store
from postbode.store.schema import deliveries, events, utcnow, webhook_requests
from postbode.testing.factories import make_app, make_queued_message
from postbode.testing.process import PostbodeProcess, free_port
from postbode.tracking import tokens
from postbode.tracking.rewrite import tracking_key
from postbode.tracking.tokens import Token
from postbode.webhooks import manage
from postbode.webhooks.deliver import WebhookWorker

SECRET = "benchmark-secret-key"
WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  local agent = {["User-Agent"] = "Mozilla/5.0 (X11) Chrome/126"}
  return wrk.format("GET", paths[(i %% #paths) + 1], agent)
end
"""

# A receiver in its own process (its own core), as lean as HTTP/1.1 keep-alive allows, so
# the figure is Postbode's and not the receiver's.
RECEIVER = r"""
import asyncio, sys

class Receiver(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buf[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            self.buf = self.buf[end:]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

async def main():
    server = await asyncio.get_running_loop().create_server(Receiver, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def clicks(args: argparse.Namespace, tmp: Path) -> None:
    data_dir = tmp / "clicks"
    settings = Settings(data_dir=data_dir, secret_key=SECRET)
    store = create_store(settings, migrate=True)
    app = make_app(store, "bench")
    _, delivery_ids = make_queued_message(
        store, app.app_id, [f"r{i}@dest.test" for i in range(args.deliveries)]
    )
    with store.write() as conn:  # delivered an hour ago: people, not scanners
        conn.execute(
            update(deliveries).values(
                status="delivered", last_attempt_at=utcnow() - timedelta(hours=1)
            )
        )
    key = tracking_key(settings, store)
    paths = [
        "/t/c/" + tokens.encode(Token("click", d, f"https://shop.test/p/{i}"), key)
        for i, d in enumerate(delivery_ids)
    ]
    store.dispose()
    env = {"POSTBODE_SECRET_KEY": SECRET, "POSTBODE_LOG_LEVEL": "warning"}
    with PostbodeProcess(data_dir, env=env, command="web") as server:
        base = server.http_url
        assert server.proc is not None
        cpu_before = _cpu_seconds(server.proc.pid)
        wrk = shutil.which("wrk")
        if wrk and not args.python_client:
            script = tmp / "clicks.lua"
            script.write_text(WRK_SCRIPT % ", ".join(f'"{p}"' for p in paths))
            out = subprocess.run(
                [
                    wrk,
                    f"-t{args.threads}",
                    f"-c{args.connections}",
                    f"-d{args.duration}s",
                    "-s",
                    str(script),
                    base,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rate = float(next(ln for ln in out.splitlines() if "Requests/sec" in ln).split()[-1])
            served = int(next(ln for ln in out.splitlines() if "requests in" in ln).split()[0])
            latency = next(ln for ln in out.splitlines() if ln.strip().startswith("Latency"))
            non_3xx = next((ln for ln in out.splitlines() if "Non-2xx or 3xx" in ln), None)
            print(
                f"clicks: {rate:,.0f} redirects/s (wrk, {args.connections} connections, "
                f"{args.threads} threads, {args.duration} s); {' '.join(latency.split())}"
            )
            if non_3xx:
                print("  " + non_3xx.strip())
        else:
            served, elapsed = asyncio.run(_python_load(base, paths, args))
            print(
                f"clicks: {served / elapsed:,.0f} redirects/s (python client, "
                f"{args.connections} connections, {served} requests in {elapsed:.2f} s)"
            )
        # The answers went out first; the events follow in group-committed batches.
        started = time.monotonic()
        store = create_store(settings, migrate=True)
        count = _count(store, EventType.MESSAGE_CLICKED)
        while True:
            time.sleep(0.2)
            now = _count(store, EventType.MESSAGE_CLICKED)
            if now == count:
                break
            count = now
        cpu = _cpu_seconds(server.proc.pid) - cpu_before
        print(
            f"clicks: {count:,} message.clicked events recorded "
            f"(backlog drained {time.monotonic() - started - 0.2:.1f} s after the load); "
            f"server CPU {cpu / served * 1e6:,.0f} us per click, recording included "
            f"= {served / cpu:,.0f} clicks per CPU-second"
        )
        store.dispose()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def variants(args: argparse.Namespace, tmp: Path) -> None:
    """The click path's cost in-process under each serving stack: h11 or httptools (with
    uvloop) if installed, FastAPI's router or tracking.endpoints.fast_path in front."""
    import importlib.util
    import threading

    import uvicorn

    from postbode.tracking.endpoints import fast_path
    from postbode.web.app import create_app

    settings = Settings(data_dir=tmp / "variants", secret_key=SECRET)
    store = create_store(settings, migrate=True)
    app = make_app(store, "bench")
    _, (delivery_id,) = make_queued_message(store, app.app_id, ["alice@dest.test"])
    with store.write() as conn:
        conn.execute(
            update(deliveries).values(
                status="delivered", last_attempt_at=utcnow() - timedelta(hours=1)
            )
        )
    path = "/t/c/" + tokens.encode(
        Token("click", delivery_id, "https://shop.test/p"), tracking_key(settings, store)
    )
    fast = importlib.util.find_spec("httptools") and importlib.util.find_spec("uvloop")
    for http, loop in [("h11", "asyncio")] + ([("httptools", "uvloop")] if fast else []):
        for front in ("fastapi", "fast_path"):
            asgi = create_app(settings, store)
            served_app = fast_path(asgi) if front == "fast_path" else asgi
            port = free_port()
            config = uvicorn.Config(
                served_app, port=port, log_level="warning", http=http, loop=loop
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(target=server.run)
            thread.start()
            while not server.started:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port}{path}"
            subprocess.run(["wrk", "-t1", "-c32", "-d1s", url], capture_output=True, check=True)
            cpu, started = time.process_time(), time.monotonic()
            out = subprocess.run(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", url],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            wall = time.monotonic() - started
            time.sleep(1.0)  # the recorder writes the last batch (its CPU counts too)
            cpu = time.process_time() - cpu
            served = int(next(ln for ln in out.splitlines() if "requests in" in ln).split()[0])
            server.should_exit = True
            thread.join()
            print(
                f"variant {http:9s} {front:9s}: {served / wall:6,.0f} redirects/s, "
                f"{cpu / served * 1e6:4,.0f} us CPU per click = {served / cpu:6,.0f} per CPU-second"
            )
    store.dispose()


def _count(store: Store, kind: EventType) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(events).where(events.c.type == str(kind))
            ).scalar_one()
        )


async def _python_load(base: str, paths: list[str], args: argparse.Namespace) -> tuple[int, float]:
    """Keep-alive GETs over raw sockets from `connections` coroutines (no wrk installed)."""
    host, port = base.removeprefix("http://").split(":")
    deadline = time.monotonic() + args.duration
    done = 0

    async def one(n: int) -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        i = n
        while time.monotonic() < deadline:
            path = paths[i % len(paths)]
            i += 1
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0 (X11) "
                "Chrome/126\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 302"):
                raise RuntimeError(head.decode())
            length = next(
                int(ln.split(b":")[1])
                for ln in head.split(b"\r\n")
                if ln.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            done += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(args.connections)))
    return done, time.monotonic() - started


def webhooks(args: argparse.Namespace, tmp: Path) -> None:
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        receiver.stdout.readline()  # "ready"
        url = args.database_url or f"sqlite:///{tmp / 'webhooks' / 'postbode.db'}"
        settings = Settings(
            data_dir=tmp / "webhooks",
            database_url=url,
            secret_key=SECRET,
            webhook_concurrency=args.webhook_concurrency,
            webhook_allow_private="127.0.0.0/8",  # the receiver runs on loopback
        )
        store = create_store(settings, migrate=True)
        app = make_app(store, "bench")
        policy = DestinationPolicy.from_settings(settings)
        manage.create_webhook(store, app.app_id, f"http://127.0.0.1:{port}/hooks", policy=policy)
        message_id, (delivery_id,) = make_queued_message(store, app.app_id, ["alice@dest.test"])
        for start in range(0, args.webhooks, 1000):
            batch = [
                Event(
                    app_id=app.app_id,
                    type=EventType.DELIVERY_DELIVERED,
                    message_id=message_id,
                    delivery_id=delivery_id,
                    recipient="alice@dest.test",
                    data={"reply": "250 2.0.0 OK", "attempt": 1, "mx": "mx1.dest.test"},
                )
                for _ in range(min(1000, args.webhooks - start))
            ]
            with store.write() as conn:
                record(conn, batch)
        # CPU time, not the wall clock: when profiling, what the process itself spends.
        profile = cProfile.Profile(time.process_time) if args.profile else None
        cpu = time.process_time()
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            elapsed = runner.run(_drain(settings, store, args.webhooks, profile))
        cpu = time.process_time() - cpu
        print(
            f"webhooks: {args.webhooks / elapsed:,.0f} deliveries/s ({args.webhooks} signed POSTs "
            f"in {elapsed:.2f} s, {args.webhook_concurrency} in flight, {store.dialect}, "
            f"{args.loop} loop, receiver in its own process); "
            f"{cpu / args.webhooks * 1e6:,.0f} us CPU per delivery in the worker process"
        )
        if profile is not None:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
        store.dispose()
    finally:
        receiver.terminate()
        receiver.wait()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The worker's event loop: uvloop's, as `postbode` runs on when it is installed, or
    asyncio's own."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


async def _drain(
    settings: Settings, store: Store, total: int, profile: cProfile.Profile | None
) -> float:
    stop = asyncio.Event()
    worker = WebhookWorker(settings, store)
    if profile is not None:
        profile.enable()
    started = time.monotonic()
    task = asyncio.create_task(worker.run(stop))

    def delivered() -> int:
        with store.read() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(webhook_requests)
                    .where(webhook_requests.c.status == "delivered")
                ).scalar_one()
            )

    # The store is the only witness of "delivered" here: a benchmark's progress poll.
    while await asyncio.to_thread(delivered) < total:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    if profile is not None:
        profile.disable()
    stop.set()
    await task
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds of click load")
    parser.add_argument("--connections", type=int, default=64, help="concurrent click clients")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--deliveries", type=int, default=200, help="distinct click tokens")
    parser.add_argument("--python-client", action="store_true", help="load without wrk")
    parser.add_argument("--webhooks", type=int, default=5000, help="webhook requests to send")
    parser.add_argument("--webhook-concurrency", type=int, default=50)
    parser.add_argument("--database-url", help="PostgreSQL for the webhook run (default SQLite)")
    parser.add_argument("--profile", action="store_true", help="profile the webhook worker")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        help="the webhook worker's event loop (default: uvloop if installed, as `postbode` runs)",
    )
    parser.add_argument("--only", choices=("clicks", "variants", "webhooks"))
    args = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "clicks"):
            clicks(args, Path(tmp))
        if args.only in (None, "variants") and shutil.which("wrk"):
            variants(args, Path(tmp))
        if args.only in (None, "webhooks"):
            with contextlib.suppress(KeyboardInterrupt):
                webhooks(args, Path(tmp))


if __name__ == "__main__":
    main()
