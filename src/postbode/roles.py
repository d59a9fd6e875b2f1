"""The roles a Postbode process runs (web, smtp, worker), side by side on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postbode.config import Settings
from postbode.metrics_dir import METRICS_ID_ENV
from postbode.store.engine import Store

if TYPE_CHECKING:
    from postbode.events.record import Queued
    from postbode.ingest.accept import Acceptor
    from postbode.runner.registry import Registry, Runnable

log = logging.getLogger("postbode")


# The queues whose runners wake-ups name, and the byte that names each on the pipes between
# `postbode serve` and its child processes.
DELIVERIES, WEBHOOK_REQUESTS, INBOUND_MESSAGES = (
    "deliveries",
    "webhook_requests",
    "inbound_messages",
)
_CODES = {DELIVERIES: b"d", WEBHOOK_REQUESTS: b"w", INBOUND_MESSAGES: b"i"}
_TABLES = {code[0]: table for table, code in _CODES.items()}
READY = b"r"  # a worker process to `serve`: my runners are running
LEAVING = b"x"  # a worker process to `serve`: idle, I stop (wake another, or yourself)


@dataclass
class Runtime:
    """What the roles of one process share: settings, store, and one Acceptor, so mail from
    SMTP and from the API is group-committed together. The Acceptor (and the ingest stack
    behind it) is made on first use: a worker process never needs it."""

    settings: Settings
    store: Store
    # This process's queue runners (the worker role's), once made.
    runners: LocalRunners | None = None
    # Where news of rows queued by a commit in this process goes (the queue's table): None,
    # this process's runners; in a child of `serve`, the parent; in `serve` with child
    # processes, its dispatch to them.
    route: Callable[[str], None] | None = None
    # In a child of `serve`: a message to the parent.
    tell_parent: Callable[[bytes], None] | None = None
    _acceptor: Acceptor | None = None
    _webhook_requests_seen: int = field(default_factory=lambda: _queued().webhook_requests)

    @property
    def acceptor(self) -> Acceptor:
        if self._acceptor is None:
            from postbode.abuse.content import ContentScanner
            from postbode.ingest.accept import Acceptor

            self._acceptor = Acceptor(
                self.store,
                self.settings.smtp_hostname,
                allow_unverified=self.settings.allow_unverified_domains,
                scanner=ContentScanner.from_settings(self.settings),
            )
            self._acceptor.on_commit.append(lambda: self.committed(DELIVERIES))
        return self._acceptor

    def committed(self, table: str) -> None:
        """A commit in this process queued rows in `table`; and webhook requests if its
        events had subscribers (an accept's `delivery.queued`, an inbound `inbound.received`):
        only those queues' runners are woken."""
        self.queued(table)
        queued = _queued().webhook_requests
        if queued != self._webhook_requests_seen:
            self._webhook_requests_seen = queued
            self.queued(WEBHOOK_REQUESTS)

    def queued(self, table: str) -> None:
        """Rows were queued in `table`: wake a runner of that queue."""
        if self.route is not None:
            self.route(table)
        elif self.runners is not None:
            self.runners.wake(table)

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()


def _queued() -> type[Queued]:
    from postbode.events.record import Queued

    return Queued


class LocalRunners:
    """This process's runner of every queue in the registry. `postbode serve` pauses them
    (they finish what they hold, then stop claiming) while worker processes drain the
    queues, and resumes them when none is left."""

    def __init__(self, runners: dict[str, Runnable]) -> None:
        self.runners = runners
        self.woken_at = time.monotonic()  # the last wake-up (for a worker process's idle time)
        self._wanted = asyncio.Event()
        self._wanted.set()
        self._halt: asyncio.Event | None = None

    def wake(self, table: str) -> None:
        """Rows were queued in `table`: its runner looks now instead of at the next poll."""
        self.woken_at = time.monotonic()
        runner = self.runners.get(table)
        if runner is not None:
            runner.notify()

    def in_hand(self, table: str | None = None) -> int:
        """Rows the runner of `table` (None: of every queue) holds now."""
        from postbode.runner.queue import QueueRunner

        held = 0
        for name, runnable in self.runners.items():
            runner = getattr(runnable, "runner", None)
            if (table is None or name == table) and isinstance(runner, QueueRunner):
                held += runner.in_hand
        return held

    def pause(self) -> None:
        self._wanted.clear()
        if self._halt is not None:
            self._halt.set()

    def resume(self) -> None:
        self._wanted.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run the runners until `stop`, except while paused."""
        from postbode.runner.queue import wait_any

        while True:
            await wait_any(stop, self._wanted)
            if stop.is_set():
                return
            halt = self._halt = asyncio.Event()
            stopping = asyncio.create_task(_set_when(stop, halt))
            try:
                await asyncio.gather(*(r.run(halt) for r in self.runners.values()))
            finally:
                self._halt = None
                stopping.cancel()


async def _set_when(event: asyncio.Event, other: asyncio.Event) -> None:
    await event.wait()
    other.set()


# A role runs until `stop` is set, then finishes what it has in hand and returns.
Role = Callable[[Runtime, asyncio.Event], Coroutine[Any, Any, None]]


async def web_role(rt: Runtime, stop: asyncio.Event) -> None:
    import uvicorn

    from postbode.web.app import serving_app

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handling: the process's roles stop together."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                listening.set()

    settings = rt.settings
    listening = asyncio.Event()
    config = uvicorn.Config(
        serving_app(settings, rt.store, rt.acceptor),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        # Forwarding headers only from the operator's proxies (uvicorn trusts 127.0.0.1 by
        # default, which would let anyone on the host pick the client address).
        proxy_headers=bool(settings.trusted_proxies.strip()),
        forwarded_allow_ips=settings.trusted_proxies.strip() or [],
    )
    server = _Server(config)
    sockets = None
    if settings.listeners > 1:  # the port is shared with the other listener processes
        try:
            sockets = [shared_socket(settings.http_host, settings.http_port)]
        except OSError as exc:
            raise RuntimeError(
                f"HTTP server could not listen on {settings.http_host}:{settings.http_port}: {exc}"
            ) from exc
    serving = asyncio.create_task(server.serve(sockets=sockets))
    stopping = asyncio.create_task(stop.wait())
    greeting = asyncio.create_task(_greet(rt, listening))
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    greeting.cancel()
    server.should_exit = True
    await serving
    stopping.cancel()
    if not server.started:
        raise RuntimeError(
            f"HTTP server could not listen on {settings.http_host}:{settings.http_port}"
        )


async def _greet(rt: Runtime, listening: asyncio.Event) -> None:
    """Once the web UI listens: where it is and how to get in (a new installation's first
    step is its setup page, which makes the owner account)."""
    await listening.wait()
    from sqlalchemy import func, select

    from postbode.store.schema import users

    def has_users() -> bool:
        with rt.store.read() as conn:
            return bool(conn.execute(select(func.count()).select_from(users)).scalar_one())

    host = rt.settings.http_host
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{rt.settings.http_port}"
    if await asyncio.to_thread(has_users):
        log.info("web UI at %s/ (sign in at %s/login)", base, base)
    else:
        log.info(
            "web UI at %s/ - no user yet: open %s/setup to create the owner account "
            "(or: postbode user create EMAIL --password-stdin --admin)",
            base,
            base,
        )


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound with SO_REUSEPORT: each listener process of `postbode
    serve` binds one to the same port, and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048, reuse_port=True)


async def smtp_role(rt: Runtime, stop: asyncio.Event) -> None:
    from postbode.bounces.intake import BounceIntake
    from postbode.inbound.intake import InboundIntake
    from postbode.ingest.smtp_server import start_server

    inbound = InboundIntake(
        rt.settings, rt.store, on_commit=[lambda: rt.committed(INBOUND_MESSAGES)]
    )
    await inbound.refresh()
    server = await start_server(
        rt.settings, rt.store, rt.acceptor, [BounceIntake(rt.settings, rt.store), inbound]
    )
    log.info("SMTP listening on %s:%s", rt.settings.smtp_host, rt.settings.smtp_port)
    await stop.wait()
    server.close()
    await server.wait_closed()
    await inbound.close()


async def worker_role(rt: Runtime, stop: asyncio.Event) -> None:
    """Every queue runner and periodic task of the registry (postbode/work.py), woken by
    commits in this process, by `serve` when a sibling process queued work, and on
    PostgreSQL by NOTIFY from any process on any node."""
    from postbode.runner.periodic import PeriodicRunner
    from postbode.work import registry

    reg = registry(rt.settings)
    runners = _make_runners(rt, reg)
    duties = [runners.run(stop), PeriodicRunner(rt.store, reg.tasks).run(stop)]
    duties += _listen(rt, runners, stop)
    await asyncio.gather(*duties)


async def queues_role(rt: Runtime, stop: asyncio.Event) -> None:
    """The queue runners alone, in a worker process `postbode serve` started when mail came
    in faster than it delivered it: the process ends after `worker_idle_seconds` without
    work (no wake-up from `serve`, no row in hand). The periodic tasks stay in `serve`."""
    from postbode.work import registry

    runners = _make_runners(rt, registry(rt.settings))
    if rt.tell_parent is not None:
        rt.tell_parent(READY)
    idle = rt.settings.worker_idle_seconds

    async def leave_when_idle() -> None:
        from postbode.runner.queue import wait_any

        while not stop.is_set():
            await wait_any(stop, timeout=min(1.0, idle / 4))
            if runners.in_hand():
                runners.woken_at = time.monotonic()
            elif time.monotonic() - runners.woken_at >= idle:
                log.info("worker process idle for %g s: leaving", idle)
                if rt.tell_parent is not None:
                    rt.tell_parent(LEAVING)
                stop.set()

    await asyncio.gather(runners.run(stop), leave_when_idle(), *_listen(rt, runners, stop))


def _make_runners(rt: Runtime, reg: Registry) -> LocalRunners:
    rt.runners = LocalRunners({spec.table: spec.make(rt.store) for spec in reg.runners})
    return rt.runners


def _listen(
    rt: Runtime, runners: LocalRunners, stop: asyncio.Event
) -> list[Coroutine[Any, Any, None]]:
    """On PostgreSQL: the runners are woken by NOTIFY from any process on any node."""
    if rt.store.is_sqlite:
        return []
    from postbode.runner.wakeup import Listener, channel  # psycopg: not loaded on SQLite

    callbacks = {channel(t): r.notify for t, r in runners.runners.items()}
    return [Listener(rt.store, callbacks).run(stop)]


CHILD_ENV = "POSTBODE_CHILD_OF_SERVE"
NOTIFY_FD_ENV = "POSTBODE_NOTIFY_FD"
RESTART_DELAY_SECONDS = 1.0


def _on_readable(fd: int, callback: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
    """Call `callback` with the bytes whenever some arrive on the pipe `fd`, `on_eof` when
    its other end is closed."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            callback(data)
        else:
            loop.remove_reader(fd)
            on_eof()

    loop.add_reader(fd, readable)


def _link_to_parent(rt: Runtime, stop: asyncio.Event) -> None:
    """In a child process of `postbode serve`: a byte on stdin names a queue where rows were
    queued elsewhere; the end of stdin means `serve` is gone (even by kill -9), and so must
    this process be. Each commit here that queued rows is told to `serve` by a byte on the
    pipe it handed down, so it can wake a worker process."""
    up = int(os.environ[NOTIFY_FD_ENV])
    os.set_blocking(up, False)

    def tell_parent(message: bytes) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the poll finds the rows
            os.write(up, message)

    def woken(data: bytes) -> None:
        if rt.runners is not None:
            for table in {_TABLES[b] for b in data if b in _TABLES}:
                rt.runners.wake(table)

    rt.tell_parent = tell_parent
    rt.route = lambda table: tell_parent(_CODES[table])
    _on_readable(sys.stdin.fileno(), woken, stop.set)


@dataclass(eq=False)
class _Child:
    kind: str  # "worker" or "listen"
    proc: asyncio.subprocess.Process
    up: int  # our end of its pipe to us
    slot: int | None = None  # a worker process's slot (its name in the metrics directory)
    ready: bool = False  # a worker process whose runners run

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class Processes:
    """The child processes of `postbode serve` and the wake-ups between them.

    Listener processes (`listeners - 1`) run from start to stop and are restarted if they
    die. Worker processes (up to `workers`) are started when mail comes in faster than the
    serve process delivers it: a commit queues deliveries while serve's own delivery runner
    still holds deliveries of an earlier claim. While any worker process runs, serve's
    runners pause and each commit's wake-up goes to one worker process in turn; a worker
    process leaves after `worker_idle_seconds` without work, and when none is left serve's
    runners take the queues again. With `worker_idle_seconds` 0 the worker processes run
    from start to stop instead (restarted if they die) and serve runs no runners."""

    def __init__(self, rt: Runtime, stop: asyncio.Event) -> None:
        self.rt = rt
        self.stop = stop
        self.settings = rt.settings
        self.on_demand = self.settings.workers > 0 and self.settings.worker_idle_seconds > 0
        self.children: list[_Child] = []
        self.starting = 0  # worker processes being spawned
        self.not_before = 0.0  # no new worker process before (a second after one crashed)
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()  # watching the children
        self._spawning: set[asyncio.Task[None]] = set()
        self._slots: set[int] = set()  # of worker processes alive or being spawned

    def workers(self, *, ready: bool = False) -> list[_Child]:
        return [
            c
            for c in self.children
            if c.kind == "worker" and c.alive and (c.ready or not ready or not self.on_demand)
        ]

    # -- wake-ups -------------------------------------------------------------------------

    def route(self, table: str) -> None:
        """Rows were queued in `table` (by a commit here or in a listener process)."""
        runners = self.rt.runners
        workers = self.workers(ready=True)
        if workers:
            self._wake(workers, table)
            if self.on_demand and len(self.workers()) + self.starting < self.settings.workers:
                self.start_workers()  # the load goes on: replace one that left or crashed
        elif runners is not None:
            runners.wake(table)
            if self.on_demand and table == DELIVERIES and runners.in_hand(DELIVERIES):
                self.start_workers()

    def _wake(self, workers: list[_Child], table: str) -> None:
        """Wake one worker process per commit, in turn: a commit's rows are claimed by
        whichever looks first, and waking every process made the others run empty claims
        (most of the CPU per message at low concurrency). Work a busy process cannot take
        waits at most one poll for the others."""
        self._turn = (self._turn + 1) % len(workers)
        stdin = workers[self._turn].proc.stdin
        if stdin is not None and stdin.transport.get_write_buffer_size() < 64:  # else pending
            stdin.write(_CODES[table])

    def _heard(self, child: _Child, data: bytes) -> None:
        if READY[0] in data and not child.ready:
            child.ready = True
            log.info("worker process %d ready", child.proc.pid)
            if self.on_demand and self.rt.runners is not None:
                self.rt.runners.pause()  # the queues are the worker processes' now
        if LEAVING[0] in data:
            child.ready = False  # no more wake-ups for it
            self._left()
        for table in {_TABLES[b] for b in data if b in _TABLES}:
            self.route(table)

    def _left(self) -> None:
        """A worker process left or is leaving: with none left, serve's runners take over
        (and look at once: rows a leaving process was woken for are found)."""
        if self.on_demand and not self.workers(ready=True) and self.rt.runners is not None:
            self.rt.runners.resume()
            _trim_heap()

    # -- processes ------------------------------------------------------------------------

    def start_workers(self) -> None:
        missing = self.settings.workers - len(self.workers()) - self.starting
        if missing <= 0 or self.stop.is_set() or time.monotonic() < self.not_before:
            return
        log.info(
            "mail comes in faster than serve delivers it: starting %d worker processes", missing
        )
        for _ in range(missing):
            self.starting += 1
            self._spawning.add(task := asyncio.create_task(self._start_worker()))
            task.add_done_callback(self._spawning.discard)

    async def _start_worker(self) -> None:
        try:
            await self.spawn("worker")
        finally:
            self.starting -= 1

    def _take_slot(self) -> int:
        slot = next(i for i in range(self.settings.workers + 1) if i not in self._slots)
        self._slots.add(slot)
        return slot

    def _keep(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def spawn(self, kind: str) -> None:
        if self.stop.is_set():
            return
        slot = self._take_slot() if kind == "worker" else None
        env = {**os.environ, CHILD_ENV: "1"}
        if slot is not None:
            # its name in the metrics directory (see metrics_dir.METRICS_ID_ENV)
            env[METRICS_ID_ENV] = f"worker{slot}"
        up_read, up_write = os.pipe()  # the child -> here
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "postbode.child",
                kind,
                stdin=asyncio.subprocess.PIPE,
                env={**env, NOTIFY_FD_ENV: str(up_write)},
                pass_fds=(up_write,),
            )
        except BaseException:
            os.close(up_read)
            if slot is not None:
                self._slots.discard(slot)
            raise
        finally:
            os.close(up_write)
        child = _Child(kind, proc, up_read, slot)
        self.children.append(child)
        _on_readable(up_read, lambda data: self._heard(child, data), lambda: None)
        self._keep(self._watch(child))

    async def _watch(self, child: _Child) -> None:
        """When the child ends: forget it, and restart it, or let serve's runners take over."""
        code = await child.proc.wait()
        asyncio.get_running_loop().remove_reader(child.up)
        os.close(child.up)
        self.children.remove(child)
        _forget_live_metrics(child.proc.pid if child.slot is None else f"worker{child.slot}")
        if child.slot is not None:
            self._slots.discard(child.slot)  # after its live gauges are gone
        if self.stop.is_set():
            return
        if child.kind == "worker" and self.on_demand:
            if code == 0:
                log.info("worker process %d left", child.proc.pid)
            else:
                log.error("worker process %d exited with %d", child.proc.pid, code)
                self.not_before = time.monotonic() + RESTART_DELAY_SECONDS
            self._left()
            return
        log.error("%s process %d exited with %d; restarting", child.kind, child.proc.pid, code)
        from postbode.runner.queue import wait_any

        await wait_any(self.stop, timeout=RESTART_DELAY_SECONDS)  # not in a hot loop
        await self.spawn(child.kind)

    async def run(self) -> None:
        s = self.settings
        kinds = ["listen"] * (s.listeners - 1) + ["worker"] * (0 if self.on_demand else s.workers)
        try:
            for kind in kinds:
                await self.spawn(kind)
            await self.stop.wait()
        finally:
            # spawns under way end at once (spawn does nothing once stop is set)
            await asyncio.gather(*self._spawning, return_exceptions=True)
            for child in self.children:
                if child.alive:
                    child.proc.terminate()
            await asyncio.gather(*(c.proc.wait() for c in self.children))
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _trim_heap() -> None:
    """Give the free pages of the C heap back to the system (glibc's malloc_trim): a burst's
    buffers are freed when it ends, but without this their pages stay resident."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def processes_role(rt: Runtime, stop: asyncio.Event) -> None:
    """The child processes of `postbode serve` (see Processes): worker processes so that
    delivery uses the other cores, and `listeners - 1` more HTTP and SMTP listener processes
    sharing the ports."""
    processes = Processes(rt, stop)
    rt.route = processes.route
    await processes.run()


def _forget_live_metrics(pid: int | str) -> None:
    """A child is gone: its live gauges (deliveries in flight) no longer count for the node."""
    from postbode.metrics import MULTIPROCESS_DIR

    if MULTIPROCESS_DIR:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]


def available_roles() -> dict[str, Role]:
    """Every role this build of Postbode knows, by name."""
    return {
        "web": web_role,
        "smtp": smtp_role,
        "worker": worker_role,
        "queues": queues_role,
        "processes": processes_role,
    }


def serve_roles(settings: Settings) -> list[str]:
    """What `postbode serve` runs: web and SMTP here (and in `listeners - 1` child processes);
    the queue runners and periodic tasks here too, and delivery in up to `workers` child
    processes while mail comes in fast (see Processes); or, with `worker_idle_seconds` 0, the
    runners and tasks in `workers` child processes from start to stop."""
    roles = ["web", "smtp"]
    if settings.workers == 0 or settings.worker_idle_seconds > 0:
        roles.append("worker")
    if settings.workers > 0 or settings.listeners > 1:
        roles.append("processes")
    return roles


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # noise at import


def start(settings: Settings, store: Store, names: list[str]) -> None:
    """Run the named roles on a fresh event loop until SIGTERM / SIGINT."""
    configure_logging(settings)
    with contextlib.suppress(ImportError):  # libuv's loop: the same asyncio, less CPU per I/O
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(run_roles(settings, store, names))


async def run_roles(settings: Settings, store: Store, names: list[str]) -> None:
    """Run the named roles until SIGTERM / SIGINT, then stop them together."""
    roles = available_roles()
    rt = Runtime(settings, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if os.environ.get(CHILD_ENV):
        _link_to_parent(rt, stop)
    tasks = [asyncio.create_task(roles[name](rt, stop), name=name) for name in names]
    log.info("postbode running: %s", ", ".join(names))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise task.exception()  # type: ignore[misc]
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await rt.close()
