"""DKIM key rotation through the management API: mail is signed with the old selector before,
the new one after, and during the grace period both keys are published and both verify."""

from __future__ import annotations

import warnings

import dkim
import dns.resolver

from postbode import tenancy
from postbode.store.engine import Store
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import StartPostbode, send
from postbode.testing.sink import SmtpSink
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient asks for httpx2
    from fastapi.testclient import TestClient


def selector_of(data: bytes) -> str:
    header = data.split(b"DKIM-Signature:", 1)[1].split(b"\r\n\r\n", 1)[0]
    tags = dict(
        t.strip().split("=", 1) for t in b"".join(header.split()).decode().split(";") if "=" in t
    )
    return tags["s"]


def test_rotation_signs_with_the_new_key_and_both_verify_in_the_grace_period(
    store: Store,
    shop: tenancy.NewApp,
    mx_sink: SmtpSink,
    dns_server: LoopbackDNS,
    start_postbode: StartPostbode,
) -> None:
    postbode = start_postbode()
    old = tenancy.dns_records(
        {**_domain(store), "previous_dkim_until": None}, "mta.postbode.test", "r.test"
    )[1]
    send(postbode, shop, "alice@dest.test", subject="before")
    before = mx_sink.wait_for_sync(1, timeout=30)[0]

    token = tenancy.create_org_token(store)["token"]
    with TestClient(create_app(postbode.settings, store)) as client:
        rotated = client.post(
            "/api/v1/apps/shop/domains/shop.test/rotate-dkim",
            json={"grace_days": 7},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert rotated.status_code == 200, rotated.text
    records = {r["purpose"]: r for r in rotated.json()["records"]}
    assert records["dkim_previous"] == {**old, "purpose": "dkim_previous"}
    # The operator publishes the new key beside the old one, as the records say.
    dns_server.add_txt(records["dkim"]["name"], records["dkim"]["value"])

    send(postbode, shop, "alice@dest.test", subject="after")
    after = next(m for m in mx_sink.wait_for_sync(2, timeout=30) if m.message["Subject"] == "after")
    assert selector_of(before.data) == old["name"].split(".")[0]
    assert selector_of(after.data) == rotated.json()["dkim_selector"]

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.address[0]]
    resolver.port = dns_server.address[1]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert dkim.verify(before.data, dnsfunc=dnsfunc), "mail signed before the rotation verifies"
    assert dkim.verify(after.data, dnsfunc=dnsfunc), "mail signed after the rotation verifies"


def _domain(store: Store) -> dict[str, object]:
    from sqlalchemy import select

    from postbode.store.schema import domains

    with store.read() as conn:
        return dict(conn.execute(select(domains)).mappings().one())
