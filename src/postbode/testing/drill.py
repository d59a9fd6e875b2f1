"""The multi-node fault drill: two `postbode serve` nodes and one `postbode worker` on a private
PostgreSQL cluster; mail in over both nodes' SMTP and API; mid-run one node's whole process
group is killed (-9) and PostgreSQL restarted while the load goes on; the node comes back.
Every message acknowledged (250 / 202) must reach the sink, duplicates only from what the
killed node had in flight, nothing stuck. Used by tests/functional/test_drill.py and
benchmarks/drill.py (which prints the counts)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiosmtplib
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.store.schema import deliveries
from postbode.testing.process import PostbodeProcess, free_port, migrate
from postbode.testing.sink import SmtpSink

PG_VERSION_DIR = Path("/usr/lib/postgresql")
_SUBJECT = re.compile(rb"^Subject: drill (\d+)\r?$", re.MULTILINE)


# -- a private PostgreSQL cluster, so restarting it disturbs nothing else ---------------------


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of its own (Debian's pg_createcluster), on a free port, trust auth
    on 127.0.0.1; dropped at the end."""

    name: str = field(default_factory=lambda: f"drill{secrets.token_hex(3)}")
    port: int = field(default_factory=free_port)
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            self.version = sorted(p.name for p in PG_VERSION_DIR.iterdir())[-1]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def restart(self) -> None:
        self._ctl("restart")

    def __enter__(self) -> PrivateCluster:
        subprocess.run(
            [
                "pg_createcluster",
                self.version,
                self.name,
                "--port",
                str(self.port),
                "--start",
                "--",
                "--auth=trust",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(
            ["pg_dropcluster", "--stop", self.version, self.name],
            capture_output=True,
            timeout=120,
        )


def available() -> str | None:
    """Why the drill cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (pg_createcluster, PostgreSQL's own user)"
    for tool in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            return f"{tool} not found (Debian's postgresql-common)"
    if not PG_VERSION_DIR.is_dir():
        return "no PostgreSQL server binaries"
    return None


# -- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    messages: int
    acknowledged: int = 0  # messages that got 250 / 202 (each exactly once in the end)
    refused_tries: int = 0  # tries answered with an error or refused a connection
    ambiguous_tries: int = 0  # tries cut off after the content went out (may have committed)
    delivered: int = 0  # distinct messages at the sink
    at_sink: int = 0  # messages at the sink, duplicates included
    duplicates: int = 0  # copies beyond the first at the sink
    unexplained_duplicates: int = 0  # beyond what ambiguous tries can explain
    killed_in_flight: int = 0  # deliveries leased to the killed node when it died
    lost: list[int] = field(default_factory=list)  # acknowledged, never at the sink
    stuck: int = 0  # deliveries not delivered at the end
    statuses: dict[str, int] = field(default_factory=dict)  # deliveries by status at the end
    errors: list[str] = field(default_factory=list)  # errors kept on stuck deliveries (a few)
    seconds: float = 0.0
    phases: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"messages sent:                 {self.messages}",
            f"acknowledged (250/202):        {self.acknowledged}",
            f"refused or failed tries:       {self.refused_tries}",
            f"tries cut off after content:   {self.ambiguous_tries}",
            f"distinct messages at the sink: {self.delivered}",
            f"copies at the sink:            {self.at_sink}",
            f"duplicates:                    {self.duplicates}"
            f" ({self.unexplained_duplicates} not from an ambiguous try)",
            f"killed node's in-flight:       {self.killed_in_flight}",
            f"acknowledged but lost:         {len(self.lost)}",
            f"stuck deliveries:              {self.stuck} {self.statuses}",
            *(f"  error: {e}" for e in self.errors),
            f"duration:                      {self.seconds:.1f} s"
            f" ({self.acknowledged / self.seconds if self.seconds else 0:.0f} msg/s)",
            *(f"  {p}" for p in self.phases),
        ]

    @property
    def passed(self) -> bool:
        return (
            self.acknowledged == self.messages
            and not self.lost
            and self.stuck == 0
            and self.unexplained_duplicates <= self.killed_in_flight
        )


# -- the nodes -----------------------------------------------------------------------------------


class Node:
    """One `postbode serve` (or `worker`) in a process group of its own, so kill -9 takes all
    of its processes at once, as a machine dying would."""

    def __init__(self, name: str, data_dir: Path, env: dict[str, str], command: str) -> None:
        self.name = name
        self.process = PostbodeProcess(data_dir, env, command=command, new_session=True)

    @property
    def up(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def pids(self) -> set[int]:
        """Every process of the node's process group."""
        assert self.process.proc is not None
        group = os.getpgid(self.process.proc.pid)
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    fields = stat.rpartition(")")[2].split()
                    if int(fields[2]) == group:
                        found.add(int(entry.name))
        return found

    def signal_group(self, signum: int) -> None:
        assert self.process.proc is not None
        os.killpg(os.getpgid(self.process.proc.pid), signum)

    def kill_group(self) -> set[int]:
        """SIGKILL to every process of the node; returns their pids."""
        pids = self.pids()
        self.signal_group(signal.SIGKILL)
        assert self.process.proc is not None
        self.process.proc.wait()
        return pids


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """Sends messages 0..n-1 to whichever nodes are up, alternating SMTP and the API, each
    tried until acknowledged."""

    app: tenancy.NewApp
    nodes: list[Node]
    n: int
    concurrency: int = 16
    acks: Counter[int] = field(default_factory=Counter)
    ambiguous: Counter[int] = field(default_factory=Counter)
    refused: int = 0

    def raw(self, i: int) -> bytes:
        return (
            f"From: Shop <orders@shop.test>\r\nTo: user{i}@dest.test\r\n"
            f"Subject: drill {i}\r\nMessage-ID: <drill-{i}-{secrets.token_hex(4)}@shop.test>\r\n"
            f"\r\nYour order {i} has shipped.\r\n"
        ).encode()

    async def run(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.n):
            queue.put_nowait(i)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await asyncio.gather(*(self._client(k, queue, http) for k in range(self.concurrency)))

    async def _client(self, k: int, queue: asyncio.Queue[int], http: aiohttp.ClientSession) -> None:
        smtp: dict[str, aiosmtplib.SMTP] = {}
        try:
            while not queue.empty():
                i = queue.get_nowait()
                tries = 0
                while not await self._try(i, k + tries, smtp, http):
                    tries += 1
                    await asyncio.sleep(min(0.05 * tries, 1.0))
        finally:
            for client in smtp.values():
                with contextlib.suppress(Exception):
                    client.close()

    async def _try(
        self, i: int, turn: int, smtp: dict[str, aiosmtplib.SMTP], http: aiohttp.ClientSession
    ) -> bool:
        live = [n for n in self.nodes if n.up and n.process.command == "serve"]
        if not live:
            return False
        node = live[(i + turn) % len(live)]
        if i % 2 == 0:
            return await self._smtp(i, node, smtp)
        return await self._api(i, node, http)

    async def _smtp(self, i: int, node: Node, clients: dict[str, aiosmtplib.SMTP]) -> bool:
        client = clients.get(node.name)
        sending = False
        try:
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=node.process.smtp_port, start_tls=False, timeout=30
                )
                await client.connect()
                await client.login(self.app.smtp_username, self.app.smtp_password)
                clients[node.name] = client
            sending = True
            await client.sendmail("orders@shop.test", [f"user{i}@dest.test"], self.raw(i))
        except aiosmtplib.SMTPResponseException:  # refused with a reply: not taken
            self._failed(i, maybe_committed=False)
            return False
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            # Cut off: once the content went out, the node may have committed it.
            clients.pop(node.name, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            self._failed(i, maybe_committed=sending)
            return False
        self.acks[i] += 1
        return True

    async def _api(self, i: int, node: Node, http: aiohttp.ClientSession) -> bool:
        body = {
            "from": "Shop <orders@shop.test>",
            "to": [f"user{i}@dest.test"],
            "subject": f"drill {i}",
            "text": f"Your order {i} has shipped.",
        }
        try:
            async with http.post(
                f"{node.process.http_url}/api/v1/messages",
                json=body,
                headers={"Authorization": f"Bearer {self.app.api_key}"},
            ) as answer:
                await answer.read()
                if answer.status == 202:
                    self.acks[i] += 1
                    return True
                self._failed(i, maybe_committed=False)  # answered with an error: not taken
        except aiohttp.ClientConnectorError:  # no connection: nothing was sent
            self._failed(i, maybe_committed=False)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._failed(i, maybe_committed=True)  # cut off mid-request: it may have committed
        return False

    def _failed(self, i: int, maybe_committed: bool) -> None:
        self.refused += 1
        if maybe_committed:
            self.ambiguous[i] += 1


# -- the drill -----------------------------------------------------------------------------------


def _settle(check: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(poll)


def _final_counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute(
            select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
        ).all()
        return {status: count for status, count in rows}


def run(
    workdir: Path,
    messages: int = 10_000,
    *,
    lease_seconds: int = 10,
    settle_timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the drill in `workdir`; returns its report (see Report.passed)."""
    report = Report(messages)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(PrivateCluster())
        migrate({"POSTBODE_DATABASE_URL": cluster.url})  # as an operator does, once
        store = create_store(Settings(database_url=cluster.url))
        stack.callback(store.dispose)
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        sink = stack.enter_context(SmtpSink())
        env = {
            "POSTBODE_DATABASE_URL": cluster.url,
            "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
            "POSTBODE_SECRET_KEY": "drill-secret-key",
            "POSTBODE_SMTP_HOSTNAME": "mta.postbode.test",
            "POSTBODE_DELIVERY_LEASE_SECONDS": str(lease_seconds),
            "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
            "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
            "POSTBODE_WORKERS": "1",
        }
        nodes = [
            Node("a", workdir / "node-a", env, "serve"),
            Node("b", workdir / "node-b", env, "serve"),
            Node("w", workdir / "worker", env, "worker"),
        ]
        for node in nodes:
            node.process.start()
            stack.callback(_stop, node)
        load = Load(app, nodes, messages)
        started = time.monotonic()

        def phase(text: str) -> None:
            line = f"{time.monotonic() - started:6.1f} s  {text}"
            report.phases.append(line)
            log(line)

        async def drive() -> None:
            loading = asyncio.create_task(load.run())
            await _until(lambda: len(load.acks) >= messages * 0.3 or loading.done())
            victim = nodes[0]
            # Killed with deliveries in its hands, which is what the drill is about. Its
            # processes may be between claims at any one moment, and a claim can finish between
            # a look at the store and the kill: so the node is frozen (SIGSTOP) before the look,
            # killed if the look finds leases, let go again if not.
            while not loading.done():
                victim.signal_group(signal.SIGSTOP)
                await asyncio.sleep(0.05)  # a commit sent just before the stop lands meanwhile
                if await asyncio.to_thread(_leased_to, store, victim.pids()):
                    break
                victim.signal_group(signal.SIGCONT)
                await asyncio.sleep(0.02)
            pids = victim.kill_group()
            report.killed_in_flight = await asyncio.to_thread(_leased_to, store, pids)
            phase(
                f"killed node a (kill -9, {len(pids)} processes): "
                f"{report.killed_in_flight} deliveries in its hands"
            )
            await _until(lambda: len(load.acks) >= messages * 0.5 or loading.done())
            phase("restarting PostgreSQL")
            await asyncio.to_thread(cluster.restart)
            phase("PostgreSQL is back")
            await _until(lambda: len(load.acks) >= messages * 0.7 or loading.done())
            await asyncio.to_thread(victim.process.start)
            phase("node a is back")
            await loading
            phase(f"all {messages} messages acknowledged")

        asyncio.run(drive())
        report.acknowledged = len(load.acks)
        report.refused_tries = load.refused
        report.ambiguous_tries = sum(load.ambiguous.values())

        def arrived() -> Counter[int]:
            seen: Counter[int] = Counter()
            for received in list(sink.messages):
                found = _SUBJECT.search(received.data)
                if found:
                    seen[int(found.group(1))] += 1
            return seen

        with contextlib.suppress(TimeoutError):
            _settle(
                lambda: (
                    set(arrived()) >= set(load.acks)
                    and _final_counts(store).keys() <= {"delivered"}
                ),
                settle_timeout,
                "every acknowledged message at the sink",
                poll=0.5,
            )
        report.seconds = time.monotonic() - started
        phase("settled")
        seen = arrived()
        report.delivered = len(seen)
        report.at_sink = sum(seen.values())
        report.duplicates = sum(n - 1 for n in seen.values() if n > 1)
        report.unexplained_duplicates = sum(
            max(0, n - 1 - load.ambiguous[i]) for i, n in seen.items()
        )
        report.lost = sorted(i for i in load.acks if i not in seen)
        counts = _final_counts(store)
        report.statuses = counts
        report.stuck = sum(n for status, n in counts.items() if status != "delivered")
        with store.read() as conn:
            report.errors = [
                f"{r.status}: {(r.error or r.last_reply or '')[-300:]}"
                for r in conn.execute(
                    select(deliveries.c.status, deliveries.c.error, deliveries.c.last_reply)
                    .where(deliveries.c.status != "delivered")
                    .limit(3)
                )
            ]
    return report


async def _until(check: Callable[[], bool]) -> None:
    """Until `check()` holds (counts kept by the load, looked at now and then)."""
    while not check():  # noqa: ASYNC110 - the load's counters are plain numbers, not events
        await asyncio.sleep(0.05)


def _leased_to(store: Store, pids: set[int]) -> int:
    """Deliveries leased to any of these processes (lease owners are host:pid:random)."""
    with store.read() as conn:
        owners = conn.execute(
            select(deliveries.c.lease_owner).where(deliveries.c.status == "sending")
        ).scalars()
        return sum(1 for owner in owners if owner and int(owner.split(":")[1]) in pids)


def _stop(node: Node) -> None:
    if node.up:
        node.process.stop()


def main_lines(report: Report) -> Iterator[str]:
    yield from report.lines()
    yield "PASSED" if report.passed else "FAILED"
