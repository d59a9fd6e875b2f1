"""Peers for the webhook tests: a webhook receiver on loopback and a WebhookWorker on its loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.servers import LoopThread
from postbode.webhooks.deliver import WebhookWorker


@dataclass(frozen=True)
class Request:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook endpoint on 127.0.0.1 and a free port: answers from a script (the last
    answer repeats) and records every request; `wait_for` blocks until enough arrived."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        self.answers = list(answers) or [(200, b"ok")]
        self.requests: list[Request] = []
        self.release = threading.Event()  # for answers scripted to stall
        self.release.set()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._cond:
                    receiver.requests.append(
                        Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    n = len(receiver.requests)
                    status, answer = receiver.answers[min(n, len(receiver.answers)) - 1]
                    receiver._cond.notify_all()
                receiver.release.wait(30)
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False  # server_close() joins the handler threads
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"
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

    def make(*answers: tuple[int, bytes]) -> Receiver:
        made.append(Receiver(*answers).__enter__())
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
