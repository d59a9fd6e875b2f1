"""The roles a Postbode process runs (web, smtp, worker), side by side on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postbode.config import Settings
from postbode.store.engine import Store

if TYPE_CHECKING:
    from postbode.ingest.accept import Acceptor

log = logging.getLogger("postbode")


@dataclass
class Runtime:
    """What the roles of one process share: settings, store, and one Acceptor, so mail from
    SMTP and from the API is group-committed together. The Acceptor (and the ingest stack
    behind it) is made on first use: a worker process never needs it."""

    settings: Settings
    store: Store
    # Called after each commit in this process that queued mail (the Acceptor's listeners).
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    # Called when another process queued mail (the parent `postbode serve` says so).
    on_wake: list[Callable[[], None]] = field(default_factory=list)
    _acceptor: Acceptor | None = None

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
            self._acceptor.on_commit = self.on_commit
        return self._acceptor

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()


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

    # Inbound commits wake workers as the acceptor's do (the same listeners).
    inbound = InboundIntake(rt.settings, rt.store, on_commit=rt.on_commit)
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
    runners = {spec.table: spec.make(rt.store) for spec in reg.runners}
    for runner in runners.values():
        rt.on_commit.append(runner.notify)
        rt.on_wake.append(runner.notify)
    duties = [r.run(stop) for r in runners.values()]
    duties.append(PeriodicRunner(rt.store, reg.tasks).run(stop))
    if not rt.store.is_sqlite:
        from postbode.runner.wakeup import Listener, channel  # psycopg: not loaded on SQLite

        listener = Listener(rt.store, {channel(t): r.notify for t, r in runners.items()})
        duties.append(listener.run(stop))
    await asyncio.gather(*duties)


CHILD_ENV = "POSTBODE_CHILD_OF_SERVE"
NOTIFY_FD_ENV = "POSTBODE_NOTIFY_FD"
RESTART_DELAY_SECONDS = 1.0


def _on_readable(fd: int, callback: Callable[[], None], on_eof: Callable[[], None]) -> None:
    """Call `callback` whenever bytes arrive on the pipe `fd` (they are drained), `on_eof`
    when its other end is closed."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            callback()
        else:
            loop.remove_reader(fd)
            on_eof()

    loop.add_reader(fd, readable)


def _link_to_parent(rt: Runtime, stop: asyncio.Event) -> None:
    """In a child process of `postbode serve`: a byte on stdin means mail was queued
    elsewhere; the end of stdin means `serve` is gone (even by kill -9), and so must this
    process be; each commit here that queued mail is told to `serve` by a byte on the pipe
    it handed down, so it can wake the worker processes."""
    notify_fd = int(os.environ[NOTIFY_FD_ENV])
    os.set_blocking(notify_fd, False)

    def tell_parent() -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending
            os.write(notify_fd, b"\n")

    def wake() -> None:
        for listener in rt.on_wake:
            listener()

    rt.on_commit.append(tell_parent)
    _on_readable(sys.stdin.fileno(), wake, stop.set)


async def processes_role(rt: Runtime, stop: asyncio.Event) -> None:
    """The child processes of `postbode serve`: `settings.workers` worker processes, so
    delivery uses the other cores, woken after each commit that queued mail; and
    `settings.listeners - 1` more HTTP and SMTP listener processes sharing the ports. Each is
    restarted if it dies."""
    kinds = ["worker"] * rt.settings.workers + ["listen"] * (rt.settings.listeners - 1)
    notify_read, notify_write = os.pipe()  # children -> here: mail was queued

    async def spawn(kind: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postbode.child",
            kind,
            stdin=asyncio.subprocess.PIPE,
            env={**os.environ, CHILD_ENV: "1", NOTIFY_FD_ENV: str(notify_write)},
            pass_fds=(notify_write,),
        )

    turn = 0

    def wake() -> None:
        """Wake one worker process per commit, in turn: a commit's rows are claimed by
        whichever looks first, and waking every process made the others run empty claims
        (most of the CPU per message at low concurrency). Work a busy process cannot take
        waits at most one poll for the others."""
        nonlocal turn
        workers = [
            child
            for kind, child in zip(kinds, children, strict=True)
            if kind == "worker" and child.stdin is not None and child.returncode is None
        ]
        if not workers:
            return
        turn = (turn + 1) % len(workers)
        child = workers[turn]
        assert child.stdin is not None
        if child.stdin.transport.get_write_buffer_size() < 64:  # else a wake-up is pending
            child.stdin.write(b"\n")

    def queued_in_a_child() -> None:
        wake()
        for listener in rt.on_wake:  # a worker role in this process too (workers = 0)
            listener()

    children = [await spawn(kind) for kind in kinds]
    rt.on_commit.append(wake)
    _on_readable(notify_read, queued_in_a_child, lambda: None)
    try:
        while not stop.is_set():
            waits = {asyncio.create_task(c.wait()) for c in children}
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({*waits, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (*waits, stopping):
                task.cancel()
            for i, child in enumerate(children):
                if child.returncode is not None:
                    _forget_live_metrics(child.pid)
                if child.returncode is not None and not stop.is_set():
                    log.error(
                        "%s process %d exited with %d; restarting",
                        kinds[i],
                        child.pid,
                        child.returncode,
                    )
                    with contextlib.suppress(TimeoutError):  # not in a hot loop if it keeps dying
                        await asyncio.wait_for(stop.wait(), RESTART_DELAY_SECONDS)
                    children[i] = await spawn(kinds[i])
    finally:
        for child in children:
            if child.returncode is None:
                child.terminate()
        await asyncio.gather(*(c.wait() for c in children))
        asyncio.get_running_loop().remove_reader(notify_read)
        os.close(notify_read)
        os.close(notify_write)


def _forget_live_metrics(pid: int) -> None:
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
        "processes": processes_role,
    }


def serve_roles(settings: Settings) -> list[str]:
    """What `postbode serve` runs: web and SMTP here (and in `listeners - 1` child processes),
    delivery in `workers` child processes (or here too when workers is 0)."""
    roles = ["web", "smtp"] if settings.workers > 0 else ["web", "smtp", "worker"]
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
