"""Peers for the webhook tests: a webhook receiver on loopback and a WebhookWorker on its loop;
the settings allow loopback destinations, as an operator allows an internal receiver."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from postbode.config import Settings
from postbode.endpoints.destinations import DestinationPolicy
from postbode.store.engine import Store
from postbode.testing.servers import LoopThread
from postbode.testing.sink import self_signed_certificate
from postbode.webhooks.deliver import WebhookWorker

LOOPBACK_ALLOWED = "127.0.0.0/8,::1,localhost"
LOOPBACK = DestinationPolicy.parse(LOOPBACK_ALLOWED)


@pytest.fixture
def settings(store: Store, tmp_path: Path) -> Settings:
    """The root `settings`, allowing webhooks to the loopback receivers."""
    url = store.engine.url.render_as_string(hide_password=False)
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        secret_key="test-secret-key",
        webhook_allow_private=LOOPBACK_ALLOWED,
    )


@dataclass(frozen=True)
class Request:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    peer_port: int  # the worker's end of the connection: the same port is a reused connection


Answer = tuple[int, bytes] | tuple[int, bytes, dict[str, str]]


class Receiver:
    """A webhook endpoint on 127.0.0.1 and a free port, HTTP/1.1 with keep-alive (over TLS
    with a self-signed certificate if `tls`): answers from a script (the last answer repeats;
    an answer is (status, body) or (status, body, headers)) and records every request;
    `wait_for` blocks until enough arrived; `open_connections` counts connections not yet
    closed."""

    def __init__(self, *answers: Answer, tls: bool = False) -> None:
        self.answers: list[Answer] = list(answers) or [(200, b"ok")]
        self.requests: list[Request] = []
        self.open_connections = 0
        self.release = threading.Event()  # for answers scripted to stall
        self.release.set()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: connections can be reused
            timeout = 20  # seconds an idle connection is kept from this end

            def setup(self) -> None:
                super().setup()
                with receiver._cond:
                    receiver.open_connections += 1

            def finish(self) -> None:
                super().finish()
                with receiver._cond:
                    receiver.open_connections -= 1
                    receiver._cond.notify_all()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._cond:
                    receiver.requests.append(
                        Request(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            self.client_address[1],
                        )
                    )
                    n = len(receiver.requests)
                    status, answer, *extra = receiver.answers[min(n, len(receiver.answers)) - 1]
                    receiver._cond.notify_all()
                receiver.release.wait(30)
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False  # server_close() joins the handler threads
        scheme = "http"
        if tls:
            self._server.socket = _self_signed_context().wrap_socket(
                self._server.socket, server_side=True
            )
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def wait_for(
        self, predicate: Callable[[list[Request]], bool] | int, timeout: float = 20.0
    ) -> list[Request]:
        check = (lambda rs: len(rs) >= predicate) if isinstance(predicate, int) else predicate
        with self._cond:
            if not self._cond.wait_for(lambda: check(self.requests), timeout):
                raise TimeoutError(f"receiver got {len(self.requests)} requests")
            return list(self.requests)

    def wait_until_closed(self, timeout: float = 5.0) -> None:
        """Until the peer has closed every connection (this end keeps them 20 s)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.open_connections == 0, timeout):
                raise TimeoutError(f"{self.open_connections} connections still open")


def _self_signed_context() -> ssl.SSLContext:
    """A server TLS context with a throw-away certificate for 127.0.0.1 (trusted by no one)."""
    cert, key = self_signed_certificate(("127.0.0.1",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads a chain from files only
        (Path(tmp) / "cert.pem").write_bytes(cert)
        (Path(tmp) / "key.pem").write_bytes(key)
        context.load_cert_chain(Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
    return context


class RunningWorker:
    """A WebhookWorker running on its own event loop thread."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.thread = LoopThread()
        self.stop_event: asyncio.Event | None = None

        async def start() -> tuple[WebhookWorker, asyncio.Future[None]]:
            self.stop_event = asyncio.Event()
            worker = WebhookWorker(settings, store)
            return worker, asyncio.ensure_future(worker.run(self.stop_event))

        self.worker, self.task = self.thread.run(start())

    def notify(self) -> None:
        """Look for due requests now (thread-safe)."""
        self.thread.loop.call_soon_threadsafe(self.worker.notify)

    def close(self) -> None:
        """Stop the worker and its loop (once; a test may stop it before the fixture does)."""
        if self.thread.loop.is_closed():
            return
        stop, task = self.stop_event, self.task
        assert stop is not None

        async def shutdown() -> None:
            stop.set()
            await task

        self.thread.run(shutdown())
        self.thread.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    """Receivers with scripted answers: make_receiver((500, b"no"), (200, b"ok"))."""
    made: list[Receiver] = []

    def make(*answers: Answer, tls: bool = False) -> Receiver:
        made.append(Receiver(*answers, tls=tls).__enter__())
        return made[-1]

    yield make
    for r in made:
        r.__exit__(None, None, None)


@pytest.fixture
def start_worker(store: Store) -> Iterator[Callable[[Settings], RunningWorker]]:
    """Start a WebhookWorker (with the settings given) on its own loop thread."""
    started: list[RunningWorker] = []

    def start(settings: Settings) -> RunningWorker:
        started.append(RunningWorker(settings, store))
        return started[-1]

    yield start
    for running in started:
        running.close()
