"""Fixtures every test may use: the socket guard, stores on SQLite and PostgreSQL, settings."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.store.schema import metadata
from postbode.testing.pg import scratch_database

PG_ADMIN_URL = os.environ.get(
    "POSTBODE_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# -- the socket guard: tests talk to loopback only ---------------------------------------------


class NetworkGuardError(RuntimeError):
    """A test tried to reach beyond loopback."""


def _is_loopback(host: Any) -> bool:
    if not isinstance(host, str):
        return True  # AF_UNIX paths and the like
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        raise NetworkGuardError(f"test tried to connect to {address!r}: loopback only")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _guarded_sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _check(self, args[-1])
    return _real_sendto(self, data, *args)  # type: ignore[arg-type]


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    # Resolving a name through the system resolver would query a DNS server off the machine.
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and not _is_loopback(name):
        raise NetworkGuardError(f"test tried to resolve {name!r}: use the loopback DNS server")
    return _real_getaddrinfo(host, *args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = _guarded_sendto  # type: ignore[method-assign]
    socket.getaddrinfo = _guarded_getaddrinfo
    # Tests send from domains they add and never publish; those about verification say
    # allow_unverified_domains=False themselves. (Child `postbode` processes inherit it.)
    os.environ.setdefault("POSTBODE_ALLOW_UNVERIFIED_DOMAINS", "true")


# -- stores --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (one per xdist worker)."""
    with scratch_database(PG_ADMIN_URL) as url:
        yield url


@pytest.fixture
def private_pg_store() -> Iterator[Store]:
    """A migrated PostgreSQL store in a database of its own, for a test that changes what the
    session's database holds for every test (its planner statistics, say)."""
    with scratch_database(PG_ADMIN_URL) as url:
        store = create_store(Settings(database_url=url), migrate=True)
        try:
            yield store
        finally:
            store.dispose()


@pytest.fixture(scope="session")
def _sqlite_session_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = create_store(Settings(data_dir=tmp_path_factory.mktemp("sqlite-store")))
    yield store
    store.dispose()


@pytest.fixture(scope="session")
def _postgresql_session_store(pg_url: str) -> Iterator[Store]:
    store = create_store(Settings(database_url=pg_url), migrate=True)
    yield store
    store.dispose()


def clean(store: Store) -> None:
    """Empty every table (the schema stays), but for the installation's secret key, which the
    processes of a test session keep: no watermark, remembered release or other shared value
    of an earlier test is left to change what the next one sees."""
    with store.write() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name == "system_values":
                conn.execute(delete(table).where(table.c.name != "secret_key"))
            else:
                conn.execute(delete(table))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A migrated, empty store; every test using it runs on SQLite and on PostgreSQL."""
    s: Store = request.getfixturevalue(f"_{request.param}_session_store")
    clean(s)
    yield s
    clean(s)


@pytest.fixture
def sqlite_store(_sqlite_session_store: Store) -> Iterator[Store]:
    """An empty store on SQLite only (for tests whose subject is not the dialect)."""
    s = _sqlite_session_store
    clean(s)
    yield s
    clean(s)


@pytest.fixture
def settings(store: Store, tmp_path: Path) -> Settings:
    """Settings naming the `store` under test, with a private data directory."""
    url = store.engine.url.render_as_string(hide_password=False)
    return Settings(data_dir=tmp_path, database_url=url, secret_key="test-secret-key")
