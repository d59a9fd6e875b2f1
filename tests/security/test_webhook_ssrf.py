"""Webhooks cannot be turned on the inside: inner destinations are refused at registration and
at connect time (after DNS, against rebinding), the log keeps a sanitised excerpt, and a
failure reads the same whether the port was closed, open to another protocol or hung up."""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import dns.asyncresolver
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from sqlalchemy import insert, select

from postbode.config import Settings
from postbode.endpoints.destinations import (
    BLOCKED_TEXT,
    CONNECTION_TEXT,
    DestinationPolicy,
    open_session,
)
from postbode.endpoints.signing import generate_secret
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import utcnow, webhook_attempts, webhooks
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import make_app
from postbode.web.app import create_app
from postbode.webhooks.deliver import WebhookWorker
from postbode.webhooks.manage import check_url

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

INNER = [
    "http://127.0.0.1:8025/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8025/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fd12::1]/",
    "http://[fe80::1%25eth0]/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://0.0.0.0:8025/",
    "http://localhost:8025/",
    "http://metadata.google.internal/",
]


@pytest.fixture
def api(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as client:
        client.headers["Authorization"] = f"Bearer {make_app(store).api_key}"
        yield client


@pytest.mark.parametrize("url", INNER)
def test_inner_destinations_are_refused_at_registration(api: TestClient, url: str) -> None:
    answer = api.post("/api/v1/webhooks", json={"url": url})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "destination_not_allowed"
    assert answer.json()["error"]["field"] == "url"
    assert api.get("/api/v1/webhooks").json()["data"] == []


def test_credentials_in_the_url_are_refused(api: TestClient) -> None:
    answer = api.post("/api/v1/webhooks", json={"url": "http://user:pw@hooks.example.com/"})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "url"


def test_changing_the_url_to_an_inner_one_is_refused(api: TestClient) -> None:
    hook = api.post("/api/v1/webhooks", json={"url": "https://hooks.example.com/in"}).json()
    answer = api.patch(f"/api/v1/webhooks/{hook['id']}", json={"url": "http://127.1:2525/"})
    assert answer.status_code == 422
    assert api.get(f"/api/v1/webhooks/{hook['id']}").json()["url"] == "https://hooks.example.com/in"


def test_the_operator_allows_an_internal_receiver(settings: Settings, store: Store) -> None:
    allowing = settings.model_copy(update={"webhook_allow_private": "10.9.0.0/16,hooks.corp.test"})
    with TestClient(create_app(allowing, store)) as client:
        client.headers["Authorization"] = f"Bearer {make_app(store).api_key}"
        for url in ("http://10.9.1.2/in", "http://hooks.corp.test:8080/in"):
            assert client.post("/api/v1/webhooks", json={"url": url}).status_code == 201
        assert client.post("/api/v1/webhooks", json={"url": "http://10.8.0.1/"}).status_code == 422


# -- at connect time ------------------------------------------------------------------------------


class LoopbackResolver(AbstractResolver):
    """aiohttp's resolver interface answered by the loopback DNS server (dnspython)."""

    def __init__(self, nameserver: str) -> None:
        host, port = nameserver.rsplit(":", 1)
        self.resolver = dns.asyncresolver.Resolver(configure=False)
        self.resolver.nameservers = [host]
        self.resolver.port = int(port)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = await self.resolver.resolve(host, "A")
        return [
            {
                "hostname": host,
                "host": r.address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for r in answer
        ]

    async def close(self) -> None:
        pass


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP endpoint on 127.0.0.1 that answers a secret: (port, bodies received)."""
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(text="internal secret: hunter2")

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, got
    finally:
        await runner.cleanup()


def hook_at(store: Store, url: str) -> int:
    """An endpoint stored as registration before these checks could have stored it, and one
    event queued for it."""
    app = make_app(store)
    with store.write() as conn:
        conn.execute(
            insert(webhooks).values(
                app_id=app.app_id,
                url=url,
                event_types=[],
                format="native",
                enabled=True,
                secret=generate_secret(),
                created_at=utcnow(),
            )
        )
        record(conn, Event(app_id=app.app_id, type=EventType.APP_ALERT, data={"x": 1}))
    return app.app_id


async def one_attempt(
    settings: Settings, store: Store, session: aiohttp.ClientSession | None = None
) -> Any:
    """Run a webhook worker until it logged an attempt; that attempt."""
    stop = asyncio.Event()
    worker = WebhookWorker(settings, store, session=session)
    running = asyncio.create_task(worker.run(stop))

    def attempt() -> Any:
        with store.read() as conn:
            return conn.execute(select(webhook_attempts)).first()

    try:
        async with asyncio.timeout(20):
            while (found := await asyncio.to_thread(attempt)) is None:
                worker.notify()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await running
    return found


def test_an_address_stored_earlier_is_refused_when_connecting(
    settings: Settings, store: Store
) -> None:
    async def run() -> None:
        async with receiver() as (port, got):
            hook_at(store, f"http://127.0.0.1:{port}/in")
            attempt = await one_attempt(settings, store)
            assert got == []
            assert attempt.error == BLOCKED_TEXT and attempt.response_body is None

    asyncio.run(run())


def test_a_name_that_resolves_inward_is_refused_when_connecting(
    settings: Settings, store: Store
) -> None:
    """DNS rebinding: the name passed registration, its address is inner when connecting."""

    async def run() -> None:
        with LoopbackDNS() as dns_server:
            dns_server.add_a("hooks.rebind.test", "127.0.0.1")
            async with receiver() as (port, got):
                policy = DestinationPolicy.from_settings(settings)
                url = check_url(f"http://hooks.rebind.test:{port}/in", policy)  # a name: fine
                hook_at(store, url)
                resolver = LoopbackResolver(dns_server.nameserver)
                async with open_session(5.0, 4, policy, resolver, user_agent="test") as session:
                    attempt = await one_attempt(settings, store, session)
                assert got == []
                assert attempt.error == BLOCKED_TEXT

    asyncio.run(run())


def test_a_name_the_operator_allows_reaches_its_internal_receiver(
    settings: Settings, store: Store
) -> None:
    allowing = settings.model_copy(update={"webhook_allow_private": "hooks.corp.test"})

    async def run() -> None:
        with LoopbackDNS() as dns_server:
            dns_server.add_a("hooks.corp.test", "127.0.0.1")
            async with receiver() as (port, got):
                hook_at(store, f"http://hooks.corp.test:{port}/in")
                policy = DestinationPolicy.from_settings(allowing)
                resolver = LoopbackResolver(dns_server.nameserver)
                async with open_session(5.0, 4, policy, resolver, user_agent="test") as session:
                    attempt = await one_attempt(allowing, store, session)
                assert len(got) == 1
                assert attempt.status_code == 200
                assert attempt.response_body == "internal secret: hunter2"

    asyncio.run(run())


async def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def raw_server(reply: bytes | None) -> AsyncIterator[int]:
    """A TCP server that sends `reply` (another protocol's greeting) and hangs up, or (None)
    hangs up at once."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if reply is not None:
            writer.write(reply)
            await writer.drain()
            await reader.read(100)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", ["closed", "smtp", "hang-up"])
def test_failures_do_not_tell_ports_apart(settings: Settings, store: Store, kind: str) -> None:
    allowing = settings.model_copy(update={"webhook_allow_private": "127.0.0.0/8"})

    async def run() -> None:
        if kind == "closed":
            port = await _closed_port()
            hook_at(store, f"http://127.0.0.1:{port}/")
            attempt = await one_attempt(allowing, store)
        else:
            greeting = b"220 mail.example ESMTP\r\n" if kind == "smtp" else None
            async with raw_server(greeting) as port:
                hook_at(store, f"http://127.0.0.1:{port}/")
                attempt = await one_attempt(allowing, store)
        assert attempt.error == CONNECTION_TEXT
        assert attempt.status_code is None

    asyncio.run(run())
