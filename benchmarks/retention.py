"""Benchmark: the retention purge of a million aged rows on SQLite, and SMTP accept latency
while it runs.

Seeds `--messages` messages received 100 days ago, each with its body, one delivered delivery,
one attempt and one event (five rows a message: 200,000 messages make 1,000,000 rows), starts
`postbode listen` (SMTP and HTTP, no workers) on the same data directory, sends mail over SMTP
at a steady rate, measures the accept latency first with the store idle and then while this
process runs the purge (as a worker's `privacy.retention` task would), and prints both, the
purge's duration and what it removed."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from sqlalchemy import func, insert, select  # noqa: E402

from postbode import tenancy  # noqa: E402
from postbode.config import Settings  # noqa: E402
from postbode.privacy.retention import PurgeReport, purge  # noqa: E402
from postbode.store.engine import Store, create_store  # noqa: E402
from postbode.store.schema import (  # noqa: E402
    attempts,
    deliveries,
    events,
    messages,
    new_id,
    raw_messages,
    utcnow,
)
from postbode.testing.process import PostbodeProcess, free_port  # noqa: E402
from postbode.testing.smtp_client import SmtpSession  # noqa: E402

SENDER = "orders@shop.test"
BODY = ("Thank you for your order. It ships tomorrow.\r\n" * 40).encode()


def seed(store: Store, app_id: int, n: int, chunk: int = 5000) -> int:
    """`n` aged messages with body, delivery, attempt and event; returns the rows written."""
    at = utcnow() - timedelta(days=100)
    raw = zlib.compress(b"Subject: order\r\nTo: <r@bench.test>\r\n\r\n" + BODY)
    rows = 0
    for start in range(0, n, chunk):
        m, r, d, a, e = [], [], [], [], []
        for i in range(start, min(n, start + chunk)):
            mid, did = new_id(), new_id()
            rcpt = f"r{i}@bench.test"
            m.append(
                {
                    "id": mid,
                    "app_id": app_id,
                    "source": "smtp",
                    "stream": "transactional",
                    "tag": "order",
                    "metadata": {"order": str(i)},
                    "message_id_header": f"<{mid}@bench.test>",
                    "mail_from": SENDER,
                    "from_header": SENDER,
                    "subject": f"Your order {i}",
                    "size": len(BODY),
                    "received_at": at,
                }
            )
            r.append({"message_id": mid, "compression": "zlib", "data": raw})
            d.append(
                {
                    "id": did,
                    "message_id": mid,
                    "app_id": app_id,
                    "recipient": rcpt,
                    "recipient_domain": "bench.test",
                    "status": "delivered",
                    "attempts": 1,
                    "next_attempt_at": at,
                    "first_queued_at": at,
                    "last_attempt_at": at,
                    "verp_token": did.hex,
                    "mx": "mx.bench.test",
                    "last_reply": f"250 2.0.0 Ok: queued for <{rcpt}>",
                    "updated_at": at,
                }
            )
            a.append(
                {
                    "id": new_id(),
                    "delivery_id": did,
                    "started_at": at,
                    "duration_ms": 40,
                    "outcome": "Delivered",
                    "mx_host": "mx.bench.test",
                    "reply_code": 250,
                    "reply_text": "2.0.0 Ok",
                    "transcript": f"> MAIL FROM:<{SENDER}>\r\n< 250 ok\r\n> RCPT TO:<{rcpt}>\r\n"
                    "< 250 ok\r\n> DATA\r\n< 354 go\r\n< 250 2.0.0 Ok\r\n",
                }
            )
            e.append(
                {
                    "id": new_id(),
                    "app_id": app_id,
                    "message_id": mid,
                    "delivery_id": did,
                    "recipient": rcpt,
                    "type": "delivery.delivered",
                    "data": {"reply": "250 2.0.0 Ok", "attempt": 1},
                    "created_at": at,
                }
            )
        with store.write() as conn:
            for table, batch in (
                (messages, m),
                (raw_messages, r),
                (deliveries, d),
                (attempts, a),
                (events, e),
            ):
                conn.execute(insert(table), batch)
                rows += len(batch)
        print(f"\r  seeded {rows:,} rows", end="", flush=True)
    print()
    return rows


async def smtp_load(
    port: int,
    app: tenancy.NewApp,
    rate: float,
    sessions: int,
    stop: threading.Event,
    latencies: list[float],
    errors: list[str],
    opened_then: Any,
) -> None:
    """`sessions` SMTP sessions sending `rate` messages a second in all until `stop`;
    `opened_then()` is called once they are open (signing in takes a while)."""
    opened = await asyncio.gather(
        *(
            SmtpSession.open("127.0.0.1", port, app.smtp_username, app.smtp_password, False)
            for _ in range(sessions)
        )
    )
    interval = sessions / rate
    opened_then()
    payload = b"From: " + SENDER.encode() + b"\r\nSubject: hi\r\n\r\n" + BODY

    async def worker(session: SmtpSession, number: int) -> None:
        next_at = time.perf_counter() + interval * number / sessions
        i = 0
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += interval
            started = time.perf_counter()
            try:
                await session.send(SENDER, f"n{number}-{i}@bench.test", payload)
            except (RuntimeError, ConnectionError) as exc:
                errors.append(str(exc)[:80])
                continue
            latencies.append(time.perf_counter() - started)
            i += 1
        await session.close()

    await asyncio.gather(*(worker(s, k) for k, s in enumerate(opened)))


def measure(
    port: int, app: tenancy.NewApp, args: argparse.Namespace, during: Any
) -> tuple[list[float], list[str], Any]:
    """Accept latencies while `during()` runs in a thread (or for `--idle-seconds`)."""
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    result: list[Any] = []

    def work() -> None:
        try:
            result.append(during())
        finally:
            stop.set()

    thread = threading.Thread(target=work)
    asyncio.run(
        smtp_load(port, app, args.rate, args.sessions, stop, latencies, errors, thread.start)
    )
    thread.join()
    return latencies, errors, result[0] if result else None


def summary(name: str, latencies: list[float], errors: list[str], seconds: float) -> str:
    if not latencies:
        return f"{name}: nothing accepted ({len(errors)} errors)"
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{name}: {len(ms):,} accepted in {seconds:.0f} s ({len(ms) / seconds:.0f}/s), "
        f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms, "
        f"{len(errors)} errors; load average {os.getloadavg()[0]:.1f}"
    )


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000, help="aged messages to seed")
    parser.add_argument("--rate", type=float, default=50.0, help="SMTP messages per second")
    parser.add_argument("--sessions", type=int, default=4, help="SMTP sessions")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=200, help="rows per purge transaction")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="postbode-retention-") as tmp:
        data_dir = Path(tmp)
        store = create_store(Settings(data_dir=data_dir))
        app = tenancy.create_app(store, "bench")
        tenancy.add_domain(store, "bench", "shop.test")
        began = time.perf_counter()
        rows = seed(store, app.app_id, args.messages)
        print(
            f"seeded {rows:,} rows ({args.messages:,} messages) in "
            f"{time.perf_counter() - began:.0f} s; database "
            f"{(data_dir / 'postbode.db').stat().st_size / 2**20:.0f} MiB"
        )
        env = {
            "POSTBODE_TRANSPORT_MAP": f"bench.test=127.0.0.1:{free_port()}",
            "POSTBODE_DNS_NAMESERVERS": f"127.0.0.1:{free_port()}",
        }
        server = PostbodeProcess(data_dir, env=env, command="listen").start()
        try:
            wait_for_port(server.smtp_port)
            began = time.perf_counter()
            idle = measure(server.smtp_port, app, args, lambda: time.sleep(args.idle_seconds))
            print(
                summary("accept, store idle   ", idle[0], idle[1], time.perf_counter() - began),
                flush=True,
            )

            def purge_all() -> tuple[PurgeReport, int, float]:
                total = PurgeReport()
                runs = 0
                started = time.perf_counter()
                while True:  # the periodic task's runs, back to back
                    report = purge(store, batch=args.batch)
                    runs += 1
                    for key, value in report.as_json().items():
                        if key != "complete":
                            setattr(total, key, getattr(total, key) + value)
                    if report.complete:
                        return total, runs, time.perf_counter() - started

            began = time.perf_counter()
            latencies, errors, (report, runs, seconds) = measure(
                server.smtp_port, app, args, purge_all
            )
            print(
                summary("accept, during purge ", latencies, errors, time.perf_counter() - began),
                flush=True,
            )
            removed = {k: v for k, v in report.as_json().items() if v and k != "complete"}
            print(
                f"purge: {seconds:.0f} s in {runs} runs, {report.batches:,} transactions; "
                f"{removed}",
                flush=True,
            )
            with store.read() as conn:
                kept = conn.execute(select(func.count()).select_from(raw_messages)).scalar_one()
            print(f"bodies left (the new mail's): {kept:,}; load average at end: {os.getloadavg()}")
        finally:
            server.stop()
            store.dispose()


if __name__ == "__main__":
    main()
