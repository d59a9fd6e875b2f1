"""Peers for the tracking tests: Postbode's HTTP app served by uvicorn on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


class HttpServer:
    """Postbode's HTTP app under uvicorn, on 127.0.0.1 and a free port, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def start(self, app: Any) -> None:
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = server = uvicorn.Server(config)
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        wait_for(lambda: server.started)

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
        self.sock.close()


@pytest.fixture
def http() -> Iterator[HttpServer]:
    """The server; the test starts it with its app (`http.start(app)`) once it knows `http.base`."""
    server = HttpServer()
    yield server
    server.stop()


@pytest.fixture
def eventually() -> Callable[..., None]:
    """`eventually(predicate)`: poll the store until it holds (others write from threads)."""
    return wait_for
