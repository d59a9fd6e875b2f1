"""Postbode's own servers run in-process for tests, on an event loop in a background thread."""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Callable, Coroutine, Sequence
from email.message import EmailMessage
from types import TracebackType
from typing import Any, Self, TypeVar

from postbode import tenancy
from postbode.abuse.content import ContentScanner
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class PostbodeInProcess:
    """SMTP listener, acceptor and delivery worker sharing one loop, as `postbode serve` runs
    them: for end-to-end tests that also look into the store."""

    run_worker = True

    def __init__(self, settings: Settings, store: Store, local: Sequence[Any] = ()) -> None:
        self.settings = settings
        self.store = store
        self.local = local
        self.host = "127.0.0.1"
        self.port = 0
        self._thread: LoopThread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Future[Any]] = []
        self._server: asyncio.Server | None = None
        self.acceptor: Acceptor | None = None
        self.worker: Any = None

    def __enter__(self) -> Self:
        from postbode.delivery.worker import DeliveryWorker
        from postbode.ingest.smtp_server import start_server

        self._thread = LoopThread()

        async def start() -> asyncio.Server:
            self._stop = asyncio.Event()
            self.acceptor = Acceptor(
                self.store,
                self.settings.smtp_hostname,
                allow_unverified=self.settings.allow_unverified_domains,
                scanner=ContentScanner.from_settings(self.settings),
            )
            if self.run_worker:
                self.worker = DeliveryWorker(self.settings, self.store)
                self.acceptor.on_commit.append(self.worker.notify)
                self._tasks.append(asyncio.ensure_future(self.worker.run(self._stop)))
            return await start_server(
                self.settings, self.store, self.acceptor, self.local, host=self.host, port=0
            )

        self._server = self._thread.run(start())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._thread is not None and self._server is not None and self._stop is not None
        server, acceptor, stop, tasks = self._server, self.acceptor, self._stop, self._tasks

        async def shutdown() -> None:
            stop.set()
            server.close()
            await server.wait_closed()
            await asyncio.gather(*tasks)
            if acceptor is not None:
                await acceptor.close()

        self._thread.run(shutdown())
        self._thread.close()


class SmtpListener(PostbodeInProcess):
    """Postbode's SMTP listener on 127.0.0.1 and a free port, with its own Acceptor (no
    delivery: what it accepts stays queued)."""

    run_worker = False


# A test fixture's way to start Postbode in-process with settings overrides.
StartPostbode = Callable[..., PostbodeInProcess]


def submit(
    server: PostbodeInProcess,
    app: tenancy.NewApp,
    msg: EmailMessage,
    to: Sequence[str] | None = None,
) -> None:
    """Hand `msg` to `server` over SMTP as the app's client does (AUTH, then the message; the
    envelope recipients are `to`, or those of the message)."""
    with smtplib.SMTP(server.host, server.port, timeout=30) as client:
        client.login(app.smtp_username, app.smtp_password)
        client.send_message(msg, to_addrs=to)


def send(
    server: PostbodeInProcess, app: tenancy.NewApp, to: str | Sequence[str], subject: str = "Hi"
) -> None:
    """Submit the tests' usual order mail from orders@shop.test to `to`."""
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg.set_content("Your order has shipped.")
    submit(server, app, msg)


class HttpPostbode(PostbodeInProcess):
    """PostbodeInProcess with the HTTP side too (API, compatible APIs, UI) on 127.0.0.1 and a
    free port, sharing the SMTP listener's Acceptor, so mail sent over HTTP is delivered by
    the same worker: `http_url` is its base URL."""

    def __init__(self, settings: Settings, store: Store, local: Sequence[Any] = ()) -> None:
        super().__init__(settings, store, local)
        self.http_port = 0
        self._http: Any = None
        self._http_task: asyncio.Future[Any] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Self:
        import socket

        import uvicorn

        from postbode.web.app import serving_app

        super().__enter__()
        assert self._thread is not None and self.acceptor is not None
        acceptor = self.acceptor
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.http_port = sock.getsockname()[1]

        async def start() -> None:
            config = uvicorn.Config(
                serving_app(self.settings, self.store, acceptor),
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
            self._http = uvicorn.Server(config)
            self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
            while not self._http.started:
                if self._http_task.done():
                    self._http_task.result()  # raises why it could not start
                await asyncio.sleep(0.01)

        try:
            self._thread.run(start())
        except BaseException:
            super().__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._thread is not None
        server, task = self._http, self._http_task

        async def stop_http() -> None:
            if server is not None and task is not None:
                server.should_exit = True
                await task

        self._thread.run(stop_http())
        super().__exit__(exc_type, exc, tb)
