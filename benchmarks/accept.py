"""Benchmark: messages/s accepted over SMTP and the HTTP API by a real `postbode serve`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import func, select

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode import tenancy  # noqa: E402
from postbode.config import Settings  # noqa: E402
from postbode.store.engine import create_store  # noqa: E402
from postbode.store.schema import messages  # noqa: E402
from postbode.testing.pg import scratch_database  # noqa: E402
from postbode.testing.process import PostbodeProcess, free_port, listening_sockets  # noqa: E402
from postbode.testing.smtp_client import SmtpSession  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "POSTBODE_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SENDER = "orders@shop.test"
RECIPIENT_DOMAIN = "bench.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """What one protocol run measured."""

    protocol: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    server_cpu: float = 0.0  # seconds of CPU the server processes used
    client_cpu: float = 0.0
    commits: float = 0.0  # group commits the server made, from its /metrics
    commit_seconds: float = 0.0
    load: float = 0.0  # the machine's 1-minute load average at the end

    def fail(self, what: str) -> None:
        self.errors[what[:80]] = self.errors.get(what[:80], 0) + 1

    def report(self, dialect: str, concurrency: int) -> str:
        ok = len(self.latencies)
        if not ok:
            return f"{dialect:10} {self.protocol:4} c={concurrency}: nothing accepted {self.errors}"
        ms = sorted(x * 1000 for x in self.latencies)
        p50 = statistics.median(ms)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        line = (
            f"{dialect:10} {self.protocol:4} c={concurrency:<3} {ok:>6} accepted in "
            f"{self.elapsed:6.2f} s = {ok / self.elapsed:7,.0f} msg/s   p50 {p50:6.1f} ms   "
            f"p99 {p99:6.1f} ms"
            f"\n{'':15} CPU: server {self.server_cpu / self.elapsed:4.0%} of a core, "
            f"{self.server_cpu / ok * 1000:.2f} ms per message "
            f"(so {ok / self.server_cpu:,.0f} msg/s per core); "
            f"client {self.client_cpu / self.elapsed:4.0%}; machine load average {self.load:.1f}"
        )
        if self.commits:
            line += (
                f"\n{'':15} {self.commits:,.0f} group commits of {ok / self.commits:.1f} "
                f"messages, {self.commit_seconds / self.commits * 1000:.1f} ms each on average "
                f"({self.commit_seconds / self.elapsed:.0%} of the time committing)"
            )
        if self.errors:
            line += f"\n{'':15} errors: {self.errors}"
        return line


# -- the message ---------------------------------------------------------------------------------


def body_text(size: int) -> str:
    """Plain text of about `size` bytes in 72-character lines."""
    words = ("order", "shipped", "thanks", "parcel", "invoice", "receipt", "total", "delivery")
    lines, line, total = [], "", 0
    while total < size:
        word = words[total % len(words)]
        if len(line) + len(word) + 1 > 72:
            lines.append(line)
            total += len(line) + 2
            line = ""
        line = f"{line} {word}" if line else word
    return "\r\n".join(lines) + "\r\n"


def smtp_message(size: int, number: int) -> bytes:
    head = (
        f"From: Shop <{SENDER}>\r\nTo: <r{number}@{RECIPIENT_DOMAIN}>\r\n"
        f"Subject: Your order {number}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nX-Postbode-Tag: order-confirmation\r\n\r\n"
    )
    return (head + body_text(max(0, size - len(head)))).encode()


def api_body(size: int, number: int) -> dict[str, object]:
    return {
        "from": f"Shop <{SENDER}>",
        "to": [f"r{number}@{RECIPIENT_DOMAIN}"],
        "subject": f"Your order {number}",
        "text": body_text(max(0, size - 400)),  # headers the API adds come to ~400 bytes
        "tag": "order-confirmation",
    }


# -- SMTP ----------------------------------------------------------------------------------------


async def smtp_load(
    server: PostbodeProcess, app: tenancy.NewApp, n: int, c: int, size: int, tls: bool, run: Run
) -> Callable[[], Awaitable[None]]:
    """Open `c` sessions; returns the coroutine function that sends `n` messages over them."""
    sessions = await asyncio.gather(
        *(
            SmtpSession.open(
                "127.0.0.1", server.smtp_port, app.smtp_username, app.smtp_password, tls
            )
            for _ in range(c)
        )
    )
    payloads = [smtp_message(size, i) for i in range(min(n, 1000))]
    counter = iter(range(n))

    async def worker(session: SmtpSession) -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                await session.send(SENDER, f"r{i}@{RECIPIENT_DOMAIN}", payloads[i % len(payloads)])
            except (RuntimeError, ConnectionError) as exc:
                run.fail(str(exc))
                continue
            run.latencies.append(time.perf_counter() - started)
        await session.close()

    async def go() -> None:
        await asyncio.gather(*(worker(s) for s in sessions))

    return go


# -- HTTP ----------------------------------------------------------------------------------------


class HttpSession:
    """One keep-alive HTTP/1.1 connection sending prebuilt requests, reading each answer.
    About as cheap as a client can be, so the figures are the server's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> HttpSession:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(head[9:12]), await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def http_request(api_key: str, body: dict[str, object]) -> bytes:
    content = json.dumps(body).encode()
    return (
        f"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    ).encode() + content


async def http_load(
    server: PostbodeProcess,
    app: tenancy.NewApp,
    n: int,
    c: int,
    size: int,
    client: str,
    run: Run,
) -> Callable[[], Awaitable[None]]:
    """`c` keep-alive connections; returns the coroutine function that sends `n` messages.

    client "raw": HttpSession. "httpx": one httpx.AsyncClient per connection; a single
    client with a pool of `c` connections spends most of the time managing the pool and
    starves connections until the server drops them as idle (encode/httpx#3215)."""
    bodies = [api_body(size, i) for i in range(min(n, 1000))]
    counter = iter(range(n))

    if client == "raw":
        requests = [http_request(app.api_key, b) for b in bodies]
        sessions = await asyncio.gather(*(HttpSession.open(server.http_port) for _ in range(c)))

        async def raw_worker(session: HttpSession) -> None:
            for i in counter:
                started = time.perf_counter()
                try:
                    status, answer = await session.send(requests[i % len(requests)])
                except (OSError, asyncio.IncompleteReadError) as exc:
                    run.fail(f"{type(exc).__name__}: {exc}")
                    return
                if status != 202:
                    run.fail(f"{status} {answer[:200]!r}")
                    continue
                run.latencies.append(time.perf_counter() - started)
            await session.close()

        async def go_raw() -> None:
            await asyncio.gather(*(raw_worker(s) for s in sessions))

        return go_raw

    clients = [
        httpx.AsyncClient(
            base_url=server.http_url,
            headers={"Authorization": f"Bearer {app.api_key}"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=60,
        )
        for _ in range(c)
    ]

    async def httpx_worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                response = await client.post("/api/v1/messages", json=bodies[i % len(bodies)])
            except httpx.HTTPError as exc:
                run.fail(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 202:
                run.fail(f"{response.status_code} {response.text}")
                continue
            run.latencies.append(time.perf_counter() - started)
        await client.aclose()

    async def go_httpx() -> None:
        await asyncio.gather(*(httpx_worker(c) for c in clients))

    # Open the connections before the clock starts, like the SMTP sessions.
    await asyncio.gather(*(c.get("/healthz") for c in clients))
    return go_httpx


# -- measuring -----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (the serve process and its worker children)."""
    found, queue = [], [pid]
    while queue:
        p = queue.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
    return found


def is_worker(pid: int) -> bool:
    """Whether `pid` is a `postbode worker` process (not a listener)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2] == b"worker"
    return False


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


@contextlib.contextmanager
def profiled(pid: int, output: Path | None) -> Iterator[None]:
    """py-spy sampling the server (with its threads and native frames) while the block runs."""
    if output is None:
        yield
        return
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [
        str(py_spy if py_spy.exists() else "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--format",
        "raw" if output.suffix == ".txt" else "speedscope",
        "--output",
        str(output),
        "--nonblocking",
        "--subprocesses",
    ]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # let it attach before the clock starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        print(f"  profile written to {output}" if output.exists() else err.decode())


def commit_totals(server: PostbodeProcess) -> tuple[float, float]:
    """(group commits so far, seconds spent in them) from the server's Prometheus metrics."""
    metrics = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    values = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in ("postbode_accept_commit_seconds_count", "postbode_accept_commit_seconds_sum"):
            values[name] = float(value)
    return (
        values.get("postbode_accept_commit_seconds_count", 0.0),
        values.get("postbode_accept_commit_seconds_sum", 0.0),
    )


def measure(
    server: PostbodeProcess,
    protocol: str,
    make: Callable[[Run], Awaitable[Callable[[], Awaitable[None]]]],
    profile: Path | None,
) -> Run:
    run = Run(protocol)

    async def main() -> None:
        go = await make(run)
        assert server.proc is not None
        pids = process_tree(server.proc.pid)
        commits, seconds = commit_totals(server)
        with profiled(server.proc.pid, profile):
            cpu, own = cpu_seconds(pids), time.process_time()
            started = time.perf_counter()
            await go()
            run.elapsed = time.perf_counter() - started
            run.server_cpu = cpu_seconds(pids) - cpu
            run.client_cpu = time.process_time() - own
            run.load = os.getloadavg()[0]
        after = commit_totals(server)
        # /metrics is one process's: with several listener processes it says too little
        if listening_sockets(server.http_port) == 1:
            run.commits, run.commit_seconds = after[0] - commits, after[1] - seconds

    asyncio.run(main())
    return run


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


@contextlib.contextmanager
def database(dialect: str, url: str | None) -> Iterator[str | None]:
    """The database URL to run against: None for SQLite in the data directory; for PostgreSQL
    the given URL, or a scratch database created here and dropped afterwards."""
    if dialect == "sqlite" or url:
        yield url
        return
    with scratch_database(PG_ADMIN_URL, "postbode_bench") as scratch:
        yield scratch


def bench_dialect(dialect: str, args: argparse.Namespace) -> list[str]:
    lines = []
    with (
        tempfile.TemporaryDirectory(prefix="postbode-bench-") as tmp,
        database(dialect, args.database_url if dialect == "postgresql" else None) as url,
    ):
        data_dir = Path(tmp)
        settings = Settings(data_dir=data_dir, database_url=url)
        store = create_store(settings, migrate=True)
        app = tenancy.create_app(store, "bench")
        tenancy.add_domain(store, "bench", "shop.test")
        env = {
            # Delivery stays on this machine: the recipients' domain leads to a closed
            # loopback port, and any DNS question to another one.
            "POSTBODE_TRANSPORT_MAP": f"{RECIPIENT_DOMAIN}=127.0.0.1:{free_port()}",
            "POSTBODE_DNS_NAMESERVERS": f"127.0.0.1:{free_port()}",
            "POSTBODE_WORKERS": str(args.workers),
            "POSTBODE_LISTENERS": str(args.listeners),
            "POSTBODE_LOG_LEVEL": "warning",
        }
        if url:
            env["POSTBODE_DATABASE_URL"] = url
        server = PostbodeProcess(data_dir, env=env)
        server.start()
        try:
            wait_for_port(server.smtp_port)
            assert server.proc is not None
            workers = [p for p in process_tree(server.proc.pid) if is_worker(p)]
            if args.delivery == "paused":
                for pid in workers:  # the accept path alone: delivery sleeps meanwhile
                    os.kill(pid, signal.SIGSTOP)
            protocols = ["smtp", "http"] if args.protocol == "both" else [args.protocol]
            for protocol in protocols:
                profile = (
                    args.profile.with_name(
                        f"{args.profile.stem}-{dialect}-{protocol}{args.profile.suffix}"
                    )
                    if args.profile
                    else None
                )
                if protocol == "smtp":
                    run = measure(
                        server,
                        "smtp",
                        lambda r: smtp_load(server, app, args.n, args.c, args.size, args.tls, r),
                        profile,
                    )
                else:
                    run = measure(
                        server,
                        "http",
                        lambda r: http_load(
                            server, app, args.n, args.c, args.size, args.http_client, r
                        ),
                        profile,
                    )
                lines.append(run.report(dialect, args.c))
                print(lines[-1], flush=True)
            with store.read() as conn:
                stored = conn.execute(select(func.count()).select_from(messages)).scalar_one()
            print(f"  {dialect}: {stored} messages in the store", flush=True)
        finally:
            if args.delivery == "paused":
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            server.stop()
            store.dispose()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=20_000, help="messages per protocol (default 20000)")
    ap.add_argument("-c", type=int, default=50, help="concurrent connections (default 50)")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes (default 2048)")
    ap.add_argument("--dialect", choices=["sqlite", "postgresql", "both"], default="sqlite")
    ap.add_argument("--protocol", choices=["smtp", "http", "both"], default="both")
    ap.add_argument(
        "--database-url",
        help="PostgreSQL database to use (default: a scratch database on 127.0.0.1:5432)",
    )
    ap.add_argument("--tls", action="store_true", help="STARTTLS on every SMTP session")
    ap.add_argument(
        "--http-client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw (default): a minimal keep-alive HTTP/1.1 client; httpx: httpx.AsyncClient",
    )
    ap.add_argument("--workers", type=int, default=1, help="POSTBODE_WORKERS for serve (default 1)")
    ap.add_argument(
        "--listeners", type=int, default=1, help="POSTBODE_LISTENERS for serve (default 1)"
    )
    ap.add_argument(
        "--delivery",
        choices=["paused", "on"],
        default="paused",
        help="paused (default): stop the delivery worker processes while measuring, so the "
        "figures are the accept path's; on: let them work (deferring to a closed port)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="record the server with py-spy into this file (one per dialect and protocol; "
        ".txt: collapsed stacks, else speedscope JSON)",
    )
    args = ap.parse_args()
    if args.delivery == "paused" and args.workers == 0:
        ap.error("--delivery paused needs worker processes (--workers 1 or more)")
    dialects = ["sqlite", "postgresql"] if args.dialect == "both" else [args.dialect]
    print(
        f"{args.n} messages of {args.size} bytes per protocol, {args.c} connections, "
        f"{args.listeners} listener process(es), delivery {args.delivery}, "
        f"HTTP client {args.http_client}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for dialect in dialects:
        bench_dialect(dialect, args)


if __name__ == "__main__":
    main()
