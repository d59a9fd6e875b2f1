"""The roles a Postbode process runs (web, smtp, worker), side by side on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store

log = logging.getLogger("postbode")


@dataclass
class Runtime:
    """What the roles of one process share: settings, store, and one Acceptor, so mail from
    SMTP and from the API is group-committed together."""

    settings: Settings
    store: Store
    acceptor: Acceptor


# A role runs until `stop` is set, then finishes what it has in hand and returns.
Role = Callable[[Runtime, asyncio.Event], Coroutine[Any, Any, None]]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process's roles stop together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def web_role(rt: Runtime, stop: asyncio.Event) -> None:
    from postbode.web.app import serving_app

    settings = rt.settings
    config = uvicorn.Config(
        serving_app(settings, rt.store, rt.acceptor),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await serving
    stopping.cancel()
    if not server.started:
        raise RuntimeError(
            f"HTTP server could not listen on {settings.http_host}:{settings.http_port}"
        )


async def smtp_role(rt: Runtime, stop: asyncio.Event) -> None:
    from postbode.bounces.intake import BounceIntake
    from postbode.ingest.smtp_server import start_server

    server = await start_server(
        rt.settings, rt.store, rt.acceptor, [BounceIntake(rt.settings, rt.store)]
    )
    log.info("SMTP listening on %s:%s", rt.settings.smtp_host, rt.settings.smtp_port)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def worker_role(rt: Runtime, stop: asyncio.Event) -> None:
    from postbode.delivery.worker import DeliveryWorker
    from postbode.webhooks.deliver import WebhookWorker

    worker = DeliveryWorker(rt.settings, rt.store)
    webhooks = WebhookWorker(rt.settings, rt.store)
    rt.acceptor.on_commit.append(worker.notify)
    rt.acceptor.on_commit.append(webhooks.notify)
    if os.environ.get(WAKEUP_ENV):
        # Started by `postbode serve`: a byte on stdin means mail was just queued; the end
        # of stdin means `serve` is gone (even by kill -9), and so must this process be.
        def wake() -> None:
            worker.notify()
            webhooks.notify()

        _on_stdin_bytes(wake, stop.set)
    await asyncio.gather(worker.run(stop), webhooks.run(stop), _compact_statistics(rt, stop))


COMPACT_EVERY_SECONDS = 300.0


async def _compact_statistics(rt: Runtime, stop: asyncio.Event) -> None:
    """Merge aged statistics rows now and then (safe from several processes at once), so
    long dashboards read thousands of rows, not millions."""
    from postbode.stats.rollup import compact

    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), COMPACT_EVERY_SECONDS)
        if stop.is_set():
            break
        try:
            await asyncio.to_thread(compact, rt.store)
        except Exception:  # the store hiccuped: the next round catches up
            log.exception("compacting statistics failed")


WAKEUP_ENV = "POSTBODE_WAKEUP_ON_STDIN"
RESTART_DELAY_SECONDS = 1.0


def _on_stdin_bytes(callback: Callable[[], None], on_eof: Callable[[], None]) -> None:
    fd = sys.stdin.fileno()
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


async def worker_processes_role(rt: Runtime, stop: asyncio.Event) -> None:
    """`settings.workers` child processes running the worker role, so delivery uses the other
    cores; they are woken after each commit that queued mail, and restarted if they die."""
    children: list[asyncio.subprocess.Process] = []

    async def spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postbode",
            "worker",
            stdin=asyncio.subprocess.PIPE,
            env={**os.environ, WAKEUP_ENV: "1"},
        )

    def wake() -> None:
        for child in children:
            if child.stdin is not None and child.returncode is None:
                transport = child.stdin.transport
                if transport.get_write_buffer_size() < 64:  # a wake-up is already pending
                    child.stdin.write(b"\n")

    children.extend([await spawn() for _ in range(rt.settings.workers)])
    rt.acceptor.on_commit.append(wake)
    while not stop.is_set():
        waits = {asyncio.create_task(c.wait()) for c in children}
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({*waits, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*waits, stopping):
            task.cancel()
        for i, child in enumerate(children):
            if child.returncode is not None and not stop.is_set():
                log.error(
                    "worker process %d exited with %d; restarting", child.pid, child.returncode
                )
                with contextlib.suppress(TimeoutError):  # not in a hot loop if it keeps dying
                    await asyncio.wait_for(stop.wait(), RESTART_DELAY_SECONDS)
                children[i] = await spawn()
    for child in children:
        if child.returncode is None:
            child.terminate()
    await asyncio.gather(*(c.wait() for c in children))


def available_roles() -> dict[str, Role]:
    """Every role this build of Postbode knows, by name."""
    return {
        "web": web_role,
        "smtp": smtp_role,
        "worker": worker_role,
        "worker-processes": worker_processes_role,
    }


def serve_roles(settings: Settings) -> list[str]:
    """What `postbode serve` runs: web and SMTP here, delivery in `workers` child processes
    (or here too when workers is 0)."""
    return ["web", "smtp", "worker-processes" if settings.workers > 0 else "worker"]


async def run_roles(settings: Settings, store: Store, names: list[str]) -> None:
    """Run the named roles until SIGTERM / SIGINT, then stop them together."""
    roles = available_roles()
    rt = Runtime(settings, store, Acceptor(store, settings.smtp_hostname))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
        await rt.acceptor.close()
