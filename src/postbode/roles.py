"""The roles a Postbode process runs (web, smtp, worker), side by side on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
    from postbode.web.app import create_app

    settings = rt.settings
    config = uvicorn.Config(
        create_app(settings, rt.store, rt.acceptor),
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
    from postbode.ingest.smtp_server import start_server

    server = await start_server(rt.settings, rt.store, rt.acceptor)
    log.info("SMTP listening on %s:%s", rt.settings.smtp_host, rt.settings.smtp_port)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def worker_role(rt: Runtime, stop: asyncio.Event) -> None:
    from postbode.delivery.worker import DeliveryWorker

    worker = DeliveryWorker(rt.settings, rt.store)
    rt.acceptor.on_commit.append(worker.notify)
    await worker.run(stop)


def available_roles() -> dict[str, Role]:
    """Every role this build of Postbode knows, by name."""
    return {"web": web_role, "smtp": smtp_role, "worker": worker_role}


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
