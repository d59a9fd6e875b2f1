"""Peers for the inbound tests: a loopback DNS server publishing the senders' SPF, DKIM and
DMARC records, an app endpoint recording what it is POSTed, and Postbode's SMTP listener with
the inbound worker on one loop, as `postbode serve` runs them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from postbode import tenancy
from postbode.bounces.intake import BounceIntake
from postbode.config import Settings
from postbode.inbound.deliver import InboundWorker
from postbode.inbound.intake import InboundIntake
from postbode.ingest.accept import Acceptor
from postbode.ingest.smtp_server import start_server
from postbode.store.engine import Store
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import LoopThread

SENDER_KEY_BITS = 1024


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


class Endpoint:
    """An app's inbound endpoint on 127.0.0.1: answers from a script (the last answer
    repeats) and records every request; `handler`, if set, decides the answer instead."""

    def __init__(self, *answers: tuple[int, bytes]) -> None:
        self.answers = list(answers) or [(200, b"ok")]
        self.requests: list[Request] = []
        self.handler: Callable[[Request], tuple[int, bytes]] | None = None
        self._cond = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with endpoint._cond:
                    endpoint.requests.append(request)
                    n = len(endpoint.requests)
                    status, answer = endpoint.answers[min(n, len(endpoint.answers)) - 1]
                    endpoint._cond.notify_all()
                if endpoint.handler is not None:
                    status, answer = endpoint.handler(request)
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/inbound"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Request]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"the endpoint got {len(self.requests)} of {count} requests")
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


class InboundPostbode:
    """Postbode's SMTP listener (return path and inbound domains) and an inbound worker on
    one loop in a thread, bound to 127.0.0.1 and a free port."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.thread = LoopThread()
        self.host = "127.0.0.1"

        async def start() -> None:
            self.stop = asyncio.Event()
            self.acceptor = Acceptor(store, settings.smtp_hostname, allow_unverified=True)
            self.worker = InboundWorker(settings, store)
            self.intake = InboundIntake(settings, store, on_commit=[self.worker.notify])
            await self.intake.refresh()
            self.task = asyncio.ensure_future(self.worker.run(self.stop))
            self.server = await start_server(
                settings,
                store,
                self.acceptor,
                [BounceIntake(settings, store), self.intake],
                host=self.host,
                port=0,
            )

        self.thread.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def refresh(self) -> None:
        """Read the routes again now (a test that changed them need not wait)."""
        self.thread.run(self.intake.refresh())

    def notify(self) -> None:
        self.thread.loop.call_soon_threadsafe(self.worker.notify)

    def close(self) -> None:
        async def shutdown() -> None:
            self.stop.set()
            self.server.close()
            await self.server.wait_closed()
            await self.task
            await self.intake.close()
            await self.acceptor.close()

        self.thread.run(shutdown())
        self.thread.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def sender_key(dns: LoopbackDNS) -> str:
    """The private key of sender.test's DKIM selector `s1`, whose public half the loopback
    DNS publishes with SPF (127.0.0.1 may send) and a DMARC policy of reject."""
    private, public = tenancy.generate_dkim_key(SENDER_KEY_BITS)
    dns.add_txt("s1._domainkey.sender.test", public)
    dns.add_txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all")
    dns.add_txt("_dmarc.sender.test", "v=DMARC1; p=reject; rua=mailto:dmarc@sender.test")
    return private


@pytest.fixture
def inbound_settings(settings: Settings, dns: LoopbackDNS, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "dns_nameservers": dns.nameserver,
            "inbound_retry_cap_seconds": 1,
            "runner_poll_seconds": 0.05,
            "smtp_hostname": "mx.postbode.test",
            # the app's endpoint is on loopback: the operator allows it, as for webhooks
            "webhook_allow_private": "127.0.0.0/8",
        }
    )


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    tenancy.add_domain(store, "shop", "in.shop.test", inbound=True)
    return created


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    made = Endpoint()
    yield made
    made.close()


@pytest.fixture
def make_endpoint() -> Iterator[Callable[..., Endpoint]]:
    made: list[Endpoint] = []

    def make(*answers: tuple[int, bytes]) -> Endpoint:
        made.append(Endpoint(*answers))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture
def postbode(
    inbound_settings: Settings, store: Store, shop: tenancy.NewApp
) -> Iterator[InboundPostbode]:
    running = InboundPostbode(inbound_settings, store)
    yield running
    running.close()
