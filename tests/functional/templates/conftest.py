"""What the template tests add to the functional tests' peers (tests/functional/conftest.py):
Postbode in-process with its HTTP side, and an API client of the shop app."""

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
