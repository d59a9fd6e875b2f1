"""What the functional tests share unless a folder or module has its own: a loopback DNS
server, an MX sink it names for dest.test, the shop app with its DKIM key published there, and
Postbode in-process resolving through it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.dns import LoopbackDNS
from postbode.testing.rspamd import Rspamd, rspamd_binary, rspamd_session
from postbode.testing.servers import PostbodeInProcess, StartPostbode
from postbode.testing.sink import SmtpSink


@pytest.fixture(scope="session")
def rspamd() -> Iterator[Rspamd]:
    """A private rspamd on loopback for the whole session (content scoring tests)."""
    if rspamd_binary() is None:
        pytest.skip("the rspamd binary is not installed: apt-get install rspamd (make deps)")
    yield from rspamd_session()


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def mx_sink(dns_server: LoopbackDNS) -> Iterator[SmtpSink]:
    """The only MX of dest.test: a sink on a random 127.x.y.z port 25, offering STARTTLS."""
    with SmtpSink.on_random_loopback(tls=True) as sink:
        dns_server.add_mx("dest.test", [(10, "mx1.dest.test")])
        dns_server.add_a("mx1.dest.test", sink.host)
        yield sink


@pytest.fixture
def shop(store: Store, dns_server: LoopbackDNS) -> tenancy.NewApp:
    created = tenancy.create_app(store, "shop")
    domain = tenancy.add_domain(store, "shop", "shop.test")
    dns_server.add_txt(f"{domain['dkim_selector']}._domainkey.shop.test", domain["dkim_public_key"])
    return created


@pytest.fixture
def start_postbode(
    settings: Settings, store: Store, dns_server: LoopbackDNS
) -> Iterator[StartPostbode]:
    """Start Postbode in-process, resolving through `dns_server`, with settings overrides."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> PostbodeInProcess:
            changed = settings.model_copy(
                update={
                    "dns_nameservers": dns_server.nameserver,
                    "smtp_hostname": "mta.postbode.test",
                    **overrides,
                }
            )
            return stack.enter_context(PostbodeInProcess(changed, store))

        yield start
