"""Benchmark: SMTP in (C authenticated connections) → `postbode serve` → SMTP out to a sink."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode.testing.pg import scratch_database  # noqa: E402
from postbode.testing.process import PostbodeProcess  # noqa: E402
from postbode.testing.smtp_client import SmtpSession  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "POSTBODE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)

# Times are time.monotonic() in every process: CLOCK_MONOTONIC is system-wide on Linux, so the
# client's accept times and the sink's delivery times are on one clock.


# -- the sink: a minimal asyncio SMTP server in its own process ----------------------------------


def run_sink(ready: Queue[Any], results: Queue[Any], count: Synchronized[int], stop: Event) -> None:
    """Accept every message, note (Message-ID, time of the final "."), report them on stop.

    Far less work per message than aiosmtpd (no per-command dispatch, no envelope objects),
    so it counts well past what Postbode sends; plain text, no STARTTLS; PIPELINING offered,
    as by Postfix and most MX servers."""
    seen: list[tuple[str, float]] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.bench ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 Go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    at = time.monotonic()
                    found = _MESSAGE_ID.search(data)
                    seen.append((found.group(1).decode() if found else "", at))
                    with count.get_lock():
                        count.value += 1
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"EHLO":
                    writer.write(
                        b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
                    )
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                    writer.write(b"250 2.0.0 OK\r\n")
                else:
                    writer.write(b"502 5.5.1 Not implemented\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", 0, limit=64 * 1024 * 1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()
        results.put(seen)

    run(main())


def run(main: Any) -> Any:
    """asyncio.run on uvloop when it is installed (Postbode's own loop), so the peers' CPU
    per message stays small beside Postbode's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# -- the load: C connections, each sending its share of the messages ------------------------------


class Client(NamedTuple):
    """How the load generator's clients behave."""

    pipelining: bool  # False: one command, then its reply (smtplib, PHPMailer)
    per_connection: int  # messages per connection before a new one (0: one for all)
    starttls: bool


def make_messages(n: int, size: int) -> list[tuple[str, str, bytes]]:
    """(Message-ID, recipient, raw) for n messages of about `size` bytes each."""
    run = secrets.token_hex(4)
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    out = []
    for i in range(n):
        mid = f"<{i}.{run}@shop.test>"
        head = (
            f"From: Shop <orders@shop.test>\r\nTo: <user{i}@dest.test>\r\n"
            f"Subject: Order {i} has shipped\r\nMessage-ID: {mid}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        ).encode()
        body = (line * (max(0, size - len(head)) // len(line) + 1))[: max(0, size - len(head))]
        out.append((mid, f"user{i}@dest.test", head + body))
    return out


async def load(
    host: str,
    port: int,
    username: str,
    password: str,
    messages: list[tuple[str, str, bytes]],
    connections: int,
    client: Client,
) -> tuple[dict[str, float], list[float], float]:
    """Send the messages over `connections` concurrent clients; returns (accept time by
    Message-ID, seconds from MAIL FROM to the final 250 per message, start time)."""
    accepted: dict[str, float] = {}
    accept_seconds: list[float] = []
    shares = [messages[i::connections] for i in range(connections)]

    async def connect() -> SmtpSession:
        session = await SmtpSession.open(host, port, username, password, client.starttls)
        session.pipelining = client.pipelining
        return session

    async def send_share(share: list[tuple[str, str, bytes]]) -> None:
        session = await connect()
        for i, (mid, rcpt, raw) in enumerate(share):
            if i and client.per_connection and i % client.per_connection == 0:
                await session.close()  # a new connection, EHLO and AUTH, as applications do
                session = await connect()
            began = time.monotonic()
            await session.send("orders@shop.test", rcpt, raw)
            accepted[mid] = time.monotonic()
            accept_seconds.append(accepted[mid] - began)
        await session.close()

    start = time.monotonic()
    await asyncio.gather(*(send_share(share) for share in shares))
    return accepted, accept_seconds, start


# -- setting up Postbode --------------------------------------------------------------------------


def postbode_cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"postbode {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU time a process has used so far (Linux /proc); `reaped`: that of its
    child processes that ended instead (0 for a process that is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return 0.0
    first = 13 if reaped else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def children(pid: int, command: str) -> list[int]:
    """The direct child processes of `pid` running `postbode <command>` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        for child in pids:
            if Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[-2] == command.encode():
                found.append(int(child))
    return found


def batch_sizes(server: PostbodeProcess) -> dict[str, float]:
    """Group commits and delivery claims so far and their mean sizes, from the server's
    /metrics (serve's own, which sums its worker processes'; not the other listeners')."""
    import httpx

    wanted = {
        "postbode_accept_batch_size_count": "commits",
        "postbode_accept_batch_size_sum": "committed",
        'postbode_runner_claim_size_count{queue="deliveries"}': "claims",
        'postbode_runner_claim_size_sum{queue="deliveries"}': "claimed",
    }
    found = {v: 0.0 for v in wanted.values()}
    for line in httpx.get(f"{server.http_url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] += float(value)
    return found


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=5000, help="messages per run (default 5000)")
    ap.add_argument(
        "-c",
        default="50",
        help="concurrent SMTP connections; a comma-separated list is a sweep (e.g. 1,5,10,50)",
    )
    ap.add_argument("--runs", type=int, default=1, help="runs of the sweep, interleaved")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes (default 2048)")
    ap.add_argument("--dialect", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument(
        "--no-pipelining",
        action="store_true",
        help="wait for each reply before the next command, as smtplib and PHPMailer do",
    )
    ap.add_argument(
        "--per-connection",
        type=int,
        default=0,
        help="messages per connection, then a new one with EHLO and AUTH (default: one for all)",
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="POSTBODE_WORKERS for serve (default: its own)"
    )
    ap.add_argument(
        "--listeners",
        type=int,
        default=None,
        help="POSTBODE_LISTENERS for serve (default: its own); serve's CPU counts them all",
    )
    ap.add_argument("--starttls", action="store_true", help="clients use STARTTLS before AUTH")
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    ap.add_argument(
        "--profile",
        type=Path,
        help="record a py-spy profile (raw folded stacks) of serve and its workers to this file",
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    return ap.parse_args()


def one_run(args: argparse.Namespace, connections: int) -> dict[str, Any]:
    """A fresh sink and a fresh `postbode serve`, n messages over `connections` clients."""
    ctx = mp.get_context("spawn")
    ready: Queue[Any] = ctx.Queue()
    results: Queue[Any] = ctx.Queue()
    count: Synchronized[int] = ctx.Value("i", 0)  # type: ignore[assignment]
    stop = ctx.Event()
    sink = ctx.Process(target=run_sink, args=(ready, results, count, stop), daemon=True)
    sink.start()
    sink_port = ready.get(timeout=30)

    data_dir = Path(tempfile.mkdtemp(prefix="postbode-bench-relay-"))
    env = {
        "POSTBODE_DATA_DIR": str(data_dir),
        "POSTBODE_TRANSPORT_MAP": f"dest.test=127.0.0.1:{sink_port}",
        "POSTBODE_DNS_NAMESERVERS": "127.0.0.1:9",  # never asked: the transport map routes all
        "POSTBODE_SMTP_HOSTNAME": "mta.bench.test",
        "POSTBODE_SECRET_KEY": "bench-secret-key",
        # One destination takes all the mail: no per-domain shaping limits.
        "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
        "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
        "POSTBODE_LOG_LEVEL": "warning",
    }
    if args.workers is not None:
        env["POSTBODE_WORKERS"] = str(args.workers)
    if args.listeners is not None:
        env["POSTBODE_LISTENERS"] = str(args.listeners)
    databases = contextlib.ExitStack()
    if args.dialect == "postgresql":
        scratch = scratch_database(PG_ADMIN_URL, "postbode_bench")
        env["POSTBODE_DATABASE_URL"] = databases.enter_context(scratch)
    server: PostbodeProcess | None = None
    profiler: subprocess.Popen[bytes] | None = None
    client = Client(not args.no_pipelining, args.per_connection, args.starttls)
    try:
        postbode_cli(env, "migrate")  # PostgreSQL: the processes do not migrate by themselves
        app = json.loads(postbode_cli(env, "app", "create", "bench", "--json"))
        postbode_cli(env, "domain", "add", "shop.test", "--app", "bench")  # DKIM-signs all mail
        server = PostbodeProcess(data_dir, env).start()
        assert server.proc is not None
        messages = make_messages(args.n, args.size)
        if args.profile:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            profiler = subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(server.proc.pid), "--subprocesses", "--gil"),
                    *("--format", "raw", "--rate", "200", "--output", str(args.profile)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)  # py-spy attaches

        workers = children(server.proc.pid, "worker")
        listeners = [server.proc.pid, *children(server.proc.pid, "listen")]
        cpu_before = {
            "serve": sum(cpu_seconds(p) for p in listeners),
            "workers": sum(cpu_seconds(w) for w in workers)
            + cpu_seconds(server.proc.pid, reaped=True),
            "sink": cpu_seconds(sink.pid or 0),
            "load generator": time.process_time(),
        }
        accepted, accept_seconds, start = run(
            load(
                "127.0.0.1",
                server.smtp_port,
                app["smtp_username"],
                app["smtp_password"],
                messages,
                connections,
                client,
            )
        )
        accept_end = time.monotonic()
        deadline = start + args.timeout
        while count.value < args.n and time.monotonic() < deadline:
            time.sleep(0.05)
        # Worker processes started during the run (serve starts them when mail comes in
        # fast) count from their start; those that left, by serve's figure for ended children.
        workers += [w for w in children(server.proc.pid, "worker") if w not in workers]
        cpu_used = {
            "serve": sum(cpu_seconds(p) for p in listeners) - cpu_before["serve"],
            "workers": sum(cpu_seconds(w) for w in workers)
            + cpu_seconds(server.proc.pid, reaped=True)
            - cpu_before["workers"],
            "sink": cpu_seconds(sink.pid or 0) - cpu_before["sink"],
            "load generator": time.process_time() - cpu_before["load generator"],
        }
        batches = batch_sizes(server)
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes the profile and exits
            profiler.wait(60)
        stop.set()
        seen: list[tuple[str, float]] = results.get(timeout=60)
    finally:
        if server is not None:
            server.stop()
        stop.set()
        sink.join(10)
        databases.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    delivered: dict[str, float] = {}
    duplicates = 0
    for mid, at in seen:
        if mid in delivered:
            duplicates += 1
        else:
            delivered[mid] = at
    missing = len(accepted) - len(set(accepted) & set(delivered))
    first_accept = min(accepted.values())
    last_delivered = max(delivered.values()) if delivered else float("nan")
    latencies = [delivered[m] - accepted[m] for m in accepted if m in delivered]
    cpu_ms = {k: v * 1000 / args.n for k, v in cpu_used.items()}
    return {
        "messages": args.n,
        "connections": connections,
        "size": args.size,
        "dialect": args.dialect,
        "pipelining": client.pipelining,
        "per_connection": client.per_connection,
        "workers": args.workers,
        "listeners": args.listeners,
        "end_to_end_per_s": len(delivered) / (last_delivered - first_accept),
        "accept_per_s": len(accepted) / (accept_end - start),
        "accept_p50_ms": statistics.median(accept_seconds) * 1000,
        "accept_p99_ms": percentile(accept_seconds, 99) * 1000,
        "latency_p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "latency_p99_ms": percentile(latencies, 99) * 1000 if latencies else float("nan"),
        "delivered": len(delivered),
        "missing": missing,
        "duplicates": duplicates,
        "wall_s": last_delivered - start,
        "cpu_ms_per_message": cpu_ms,
        "postbode_cpu_ms_per_message": cpu_ms["serve"] + cpu_ms["workers"],
        "group_commits": batches["commits"],
        "messages_per_commit": batches["committed"] / max(batches["commits"], 1),
        "claims": batches["claims"],
        "deliveries_per_claim": batches["claimed"] / max(batches["claims"], 1),
        "load_average": os.getloadavg()[0],
    }


def report(f: dict[str, Any]) -> None:
    print(
        f"{f['messages']} messages of {f['size']} B over {f['connections']} connections "
        f"({'pipelining' if f['pipelining'] else 'no pipelining'}, "
        f"{f['per_connection'] or 'all'} per connection), {f['dialect']}, "
        f"workers={'default' if f['workers'] is None else f['workers']}, "
        f"listeners={'default' if f['listeners'] is None else f['listeners']}"
    )
    print(
        f"  end to end {f['end_to_end_per_s']:,.0f} msg/s ({f['wall_s']:.1f} s wall); "
        f"accept {f['accept_per_s']:,.0f} msg/s, p50 {f['accept_p50_ms']:.1f} ms, "
        f"p99 {f['accept_p99_ms']:.1f} ms; accept->delivered p50 {f['latency_p50_ms']:,.0f} ms, "
        f"p99 {f['latency_p99_ms']:,.0f} ms"
    )
    print(
        f"  delivered {f['delivered']}, missing {f['missing']}, duplicates {f['duplicates']}; "
        "CPU per message: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in f["cpu_ms_per_message"].items())
        + f" (load average {f['load_average']:.1f} on {os.cpu_count()} cores)"
    )
    print(
        f"  {f['group_commits']:,.0f} group commits of {f['messages_per_commit']:.1f} messages, "
        f"{f['claims']:,.0f} claims of {f['deliveries_per_claim']:.1f} deliveries on average"
    )


def summary(rows: list[dict[str, Any]]) -> None:
    """Median and spread (min-max) per concurrency over the runs."""
    print("\n C | runs | end to end msg/s       | Postbode CPU ms/msg | accept p99 ms")
    for c in sorted({r["connections"] for r in rows}):
        mine = [r for r in rows if r["connections"] == c]

        def cell(key: str, fmt: str, mine: list[dict[str, Any]] = mine) -> str:
            values = [r[key] for r in mine]
            return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

        print(
            f"{c:>2} | {len(mine):>4} | {cell('end_to_end_per_s', ',.0f'):<22} | "
            f"{cell('postbode_cpu_ms_per_message', '.2f'):<19} | {cell('accept_p99_ms', '.1f')}"
        )


def main() -> None:
    args = parse_args()
    sweep = [int(c) for c in str(args.c).split(",")]
    rows = []
    for _ in range(args.runs):
        for connections in sweep:  # interleaved: drift in the machine's load hits all alike
            figures = one_run(args, connections)
            report(figures)
            if args.json:
                print(json.dumps(figures))
            rows.append(figures)
    if len(rows) > 1:
        summary(rows)
    if any(r["missing"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
