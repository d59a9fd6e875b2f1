"""Benchmark: inbound messages/s a real `postbode serve` takes in over SMTP without AUTH (as the
MX of an app's inbound domain), each stored durably before its 250."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept import body_text, cpu_seconds, is_worker, process_tree, wait_for_port  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from postbode import tenancy  # noqa: E402
from postbode.config import Settings  # noqa: E402
from postbode.endpoints.destinations import DestinationPolicy  # noqa: E402
from postbode.inbound.routes import create_route  # noqa: E402
from postbode.store.engine import create_store  # noqa: E402
from postbode.store.schema import inbound_messages  # noqa: E402
from postbode.testing.process import PostbodeProcess, free_port  # noqa: E402
from postbode.testing.smtp_client import SmtpSession  # noqa: E402

DOMAIN = "in.shop.test"


def message(size: int, number: int) -> bytes:
    head = (
        f"From: Customer {number} <c{number}@sender.test>\r\nTo: <support+{number}@{DOMAIN}>\r\n"
        f"Subject: Re: your order {number}\r\nMessage-ID: <r{number}@sender.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return (head + body_text(max(0, size - len(head)))).encode()


async def load(port: int, n: int, c: int, size: int) -> tuple[list[float], dict[str, int], float]:
    """`c` sessions from `c` loopback addresses (sending MTAs are many hosts), `n` messages;
    returns (latencies, errors, elapsed seconds)."""
    sessions = await asyncio.gather(
        *(
            SmtpSession.open("127.0.0.1", port, None, None, False, source=f"127.0.1.{i + 1}")
            for i in range(c)
        )
    )
    payloads = [message(size, i) for i in range(min(n, 1000))]
    counter = iter(range(n))
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker(session: SmtpSession) -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                await session.send(
                    f"c{i}@sender.test", f"support+{i}@{DOMAIN}", payloads[i % len(payloads)]
                )
            except (RuntimeError, ConnectionError) as exc:
                errors[str(exc)[:80]] = errors.get(str(exc)[:80], 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
        await session.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sessions))
    return latencies, errors, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    ap.add_argument("-c", type=int, default=20, help="concurrent SMTP sessions (default 20)")
    ap.add_argument("--size", type=int, default=10_240, help="message size (default 10240)")
    args = ap.parse_args()
    print(
        f"{args.n} inbound messages of {args.size} bytes, {args.c} sessions, SQLite, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="postbode-bench-") as tmp:
        data_dir = Path(tmp)
        store = create_store(Settings(data_dir=data_dir))
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", DOMAIN, inbound=True)
        # The hand-offs would go to a closed loopback port; the worker is paused anyway.
        create_route(
            store,
            app.app_id,
            f"support@{DOMAIN}",
            url=f"http://127.0.0.1:{free_port()}/",
            policy=DestinationPolicy.parse("127.0.0.0/8"),
        )
        env = {
            "POSTBODE_WORKERS": "1",
            "POSTBODE_DNS_NAMESERVERS": f"127.0.0.1:{free_port()}",
            "POSTBODE_LOG_LEVEL": "warning",
            "POSTBODE_WEBHOOK_ALLOW_PRIVATE": "127.0.0.0/8",
            # room for the benchmark's sessions where unauthenticated sessions are capped
            "POSTBODE_SMTP_UNAUTHENTICATED_SESSIONS": str(max(100, 2 * args.c)),
            "POSTBODE_SMTP_UNAUTHENTICATED_MAX_MESSAGE_SIZE": str(max(2 << 20, 2 * args.size)),
        }
        server = PostbodeProcess(data_dir, env=env)
        server.start()
        workers: list[int] = []
        try:
            wait_for_port(server.smtp_port)
            assert server.proc is not None
            tree = process_tree(server.proc.pid)
            workers = [p for p in tree if is_worker(p)]
            for pid in workers:  # the accept path alone: hand-offs wait meanwhile
                os.kill(pid, signal.SIGSTOP)
            listeners = [p for p in tree if p not in workers]
            cpu = cpu_seconds(listeners)
            latencies, errors, elapsed = asyncio.run(
                load(server.smtp_port, args.n, args.c, args.size)
            )
            server_cpu = cpu_seconds(listeners) - cpu
            load_after = os.getloadavg()[0]
            with store.read() as conn:
                stored = conn.execute(
                    select(func.count()).select_from(inbound_messages)
                ).scalar_one()
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            server.stop()
            store.dispose()
    ok = len(latencies)
    ms = sorted(x * 1000 for x in latencies)
    print(
        f"sqlite inbound c={args.c} {ok} accepted in {elapsed:.2f} s = {ok / elapsed:,.0f} msg/s"
        f"   p50 {statistics.median(ms):.1f} ms   p99 {ms[int(len(ms) * 0.99)]:.1f} ms\n"
        f"  server CPU {server_cpu / elapsed:.0%} of a core, {server_cpu / ok * 1000:.2f} ms per "
        f"message; {stored} stored; machine load average {load_after:.1f} after"
        + (f"\n  errors: {errors}" if errors else ""),
        flush=True,
    )


if __name__ == "__main__":
    main()
