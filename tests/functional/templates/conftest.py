"""What the template tests share: a loopback DNS server, an MX sink for dest.test, the shop
app with its DKIM key published, and Postbode in-process with its HTTP side."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import httpx
import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import SmtpSink


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def mx_sink(dns_server: LoopbackDNS) -> Iterator[SmtpSink]:
    with SmtpSink.on_random_loopback(tls=False) as sink:
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
def postbode(settings: Settings, store: Store, dns_server: LoopbackDNS) -> Iterator[HttpPostbode]:
    changed = settings.model_copy(
        update={
            "dns_nameservers": dns_server.nameserver,
            "smtp_hostname": "mta.postbode.test",
            # the pixel's host; the tests fetch its path from this server
            "tracking_url": "http://track.postbode.test",
        }
    )
    with HttpPostbode(changed, store) as server:
        yield server


@pytest.fixture
def api(postbode: HttpPostbode, shop: tenancy.NewApp) -> Iterator[httpx.Client]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = httpx.Client(
            base_url=postbode.http_url,
            headers={"Authorization": f"Bearer {shop.api_key}"},
            timeout=60,
        )
    with client:
        yield client
