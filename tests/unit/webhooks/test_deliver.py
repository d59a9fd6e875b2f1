"""The webhook worker's pure parts (Retry-After, error names) and who owns its HTTP session."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from postbode.config import Settings
from postbode.endpoints.destinations import (
    BLOCKED_TEXT,
    CONNECTION_TEXT,
    BlockedDestination,
    describe_failure,
)
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.webhooks import deliver
from postbode.webhooks.deliver import WebhookWorker, _retry_after


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert _retry_after("120") == 120.0
    assert _retry_after(" 7 ") == 7.0
    in_ten_minutes = format_datetime(utcnow() + timedelta(minutes=10), usegmt=True)
    assert 595 <= (_retry_after(in_ten_minutes) or 0) <= 600
    past = format_datetime(utcnow() - timedelta(minutes=10), usegmt=True)
    assert _retry_after(past) == 0.0
    for unusable in (None, "", "soon", "-5", "1.5", "Wed, 21 Oct 2015 07:28:00 -0000"):
        assert _retry_after(unusable) is None, unusable


def test_errors_are_one_text_per_failure_class() -> None:
    """A closed port, a port open to another protocol and a reset connection read alike: the
    log must not help map a network."""
    conn_key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    same = {
        describe_failure(aiohttp.ServerDisconnectedError()),
        describe_failure(aiohttp.ClientPayloadError("Response payload is not completed")),
        describe_failure(aiohttp.ClientOSError(104, "Connection reset by peer")),
        describe_failure(aiohttp.ClientConnectionResetError("Cannot write to closing transport")),
        describe_failure(aiohttp.ClientConnectorError(conn_key, ConnectionRefusedError(111, "x"))),
        describe_failure(aiohttp.ClientResponseError(None, (), message="Invalid status line")),  # type: ignore[arg-type]
        describe_failure(aiohttp.InvalidUrlClientError("ftp:/x")),
    }
    assert same == {CONNECTION_TEXT}
    blocked = aiohttp.ClientConnectorError(conn_key, BlockedDestination(BLOCKED_TEXT))
    assert describe_failure(blocked) == BLOCKED_TEXT


@pytest.fixture
def quiet_settings(sqlite_store: Store, tmp_path: Path) -> Settings:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    return Settings(data_dir=tmp_path, database_url=url, secret_key="test-secret-key")


def test_a_given_session_is_used_and_never_closed(
    quiet_settings: Settings, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_session(*args: object, **kwargs: object) -> aiohttp.ClientSession:
        raise AssertionError("the worker made a session of its own")

    monkeypatch.setattr(deliver, "open_session", no_session)

    async def run() -> None:
        async with aiohttp.ClientSession() as given:
            stop = asyncio.Event()
            stop.set()
            await WebhookWorker(quiet_settings, sqlite_store, session=given).run(stop)
            assert not given.closed

    asyncio.run(run())


def test_the_worker_closes_the_session_it_made(
    quiet_settings: Settings, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[aiohttp.ClientSession] = []
    real = deliver.open_session

    def recording(
        timeout: float, pool_size: int, *args: Any, **kwargs: Any
    ) -> aiohttp.ClientSession:
        made.append(real(timeout, pool_size, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(deliver, "open_session", recording)

    async def run() -> None:
        stop = asyncio.Event()
        stop.set()
        await WebhookWorker(quiet_settings, sqlite_store).run(stop)

    asyncio.run(run())
    (session,) = made
    assert session.closed
