"""Names do not tell one tenant about another: app names are unique per organisation only,
and a domain name is claimed by any organisation that adds it, each claim with its own DKIM
key, while DNS decides which claim holds the name. Another organisation's claim of a domain
that is held gets the answers a fresh domain gets, cannot verify, send, sign, or take the
domain's bounces or inbound mail."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from postbode import dnscheck, tenancy
from postbode.bounces.intake import BounceIntake
from postbode.cli import app as cli
from postbode.config import Settings
from postbode.delivery.outgoing import Outgoing
from postbode.inbound import routes
from postbode.inbound.intake import InboundIntake
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    deliveries,
    domains,
    inbound_messages,
    messages,
    organizations,
    utcnow,
)
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import make_queued_message
from postbode.web.app import create_app

RETURN = "return.postbode.localhost"


@pytest.fixture(autouse=True)
def _fast_tenancy(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = iter([tenancy.generate_dkim_key(1024) for _ in range(8)])
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: next(keys))
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


@pytest.fixture
def strict(settings: Settings) -> Settings:
    return settings.model_copy(update={"allow_unverified_domains": False})


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


def publish(
    dns: LoopbackDNS, claim: dict[str, Any], settings: Settings, purposes: tuple[str, ...] = ()
) -> None:
    """Publish what Postbode asks of this claim (its own DKIM selector and key); `purposes`:
    only those records."""
    for r in tenancy.dns_records(claim, settings.smtp_hostname, settings.return_path_domain):
        if purposes and r["purpose"] not in purposes:
            continue
        if r["type"] == "CNAME":
            dns.add_cname(r["name"], r["value"])
        else:
            dns.add_txt(r["name"], r["value"])


def check(
    store: Store, settings: Settings, dns: LoopbackDNS, name: str, app_id: int
) -> dnscheck.DomainCheck:
    reader = dnscheck.DnsReader(dns.nameserver, timeout=2.0)
    return asyncio.run(dnscheck.check_domain(store, settings, name, app_id=app_id, reader=reader))


def claim_of(store: Store, name: str, app_id: int) -> dict[str, Any]:
    with store.read() as conn:
        return dict(
            conn.execute(select(domains).where(domains.c.name == name, domains.c.app_id == app_id))
            .mappings()
            .one()
        )


@pytest.fixture
def org_a(store: Store, strict: Settings, dns: LoopbackDNS) -> tenancy.NewApp:
    """Organisation A's app `shop`, which holds shop.test (verified through DNS) and takes
    inbound mail at in.shop.test."""
    app = tenancy.create_app(store, "shop", "org-a")
    for name, inbound in (("shop.test", False), ("in.shop.test", True)):
        claim = tenancy.add_domain(store, "shop", name, inbound=inbound, organization="org-a")
        publish(dns, claim, strict)
        assert check(store, strict, dns, name, app.app_id).verified
    return app


@pytest.fixture
def api(strict: Settings, store: Store) -> Iterator[TestClient]:
    acceptor = Acceptor(store, strict.smtp_hostname, allow_unverified=False)
    with TestClient(create_app(strict, store, acceptor)) as client:
        yield client
        assert client.portal is not None
        client.portal.call(acceptor.close)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def send(api: TestClient, key: str, sender: str) -> Any:
    body = {"from": sender, "to": ["alice@dest.test"], "subject": "Hi", "text": "x"}
    return api.post("/api/v1/messages", json=body, headers=bearer(key))


def apps_of_stored_messages(store: Store) -> list[int]:
    with store.read() as conn:
        return sorted(conn.execute(select(messages.c.app_id)).scalars())


# -- app names ---------------------------------------------------------------------------------


def test_another_organisation_creates_an_app_of_the_same_name(
    api: TestClient, store: Store, strict: Settings, dns: LoopbackDNS
) -> None:
    token_a = tenancy.create_org_token(store, "org-a")["token"]
    token_b = tenancy.create_org_token(store, "org-b")["token"]
    made_a = api.post("/api/v1/apps", json={"name": "shop"}, headers=bearer(token_a))
    made_b = api.post("/api/v1/apps", json={"name": "shop"}, headers=bearer(token_b))
    assert (made_a.status_code, made_b.status_code) == (201, 201), made_b.text
    again = api.post("/api/v1/apps", json={"name": "shop"}, headers=bearer(token_b))
    assert again.status_code == 409  # within its own organisation a name is still taken

    # Each token sees and manages its own `shop`
    id_a = api.get("/api/v1/apps/shop", headers=bearer(token_a)).json()["id"]
    id_b = api.get("/api/v1/apps/shop", headers=bearer(token_b)).json()["id"]
    assert id_a != id_b
    paused = api.post("/api/v1/apps/shop/suspend", headers=bearer(token_b))
    assert paused.json()["status"] == "suspended"
    assert api.get("/api/v1/apps/shop", headers=bearer(token_a)).json()["status"] == "active"
    api.post("/api/v1/apps/shop/resume", headers=bearer(token_b))

    # Both send, each as its own verified domain, with its own key
    for token, app_id, name in ((token_a, id_a, "a-shop.test"), (token_b, id_b, "b-shop.test")):
        added = api.post("/api/v1/apps/shop/domains", json={"name": name}, headers=bearer(token))
        assert added.status_code == 201
        publish(dns, claim_of(store, name, app_id), strict)
        assert check(store, strict, dns, name, app_id).verified
    key_a = made_a.json()["api_key"]
    key_b = made_b.json()["api_key"]
    assert send(api, key_a, "orders@a-shop.test").status_code == 202
    assert send(api, key_b, "orders@b-shop.test").status_code == 202
    assert send(api, key_b, "orders@a-shop.test").json()["error"]["code"] == "foreign_domain"
    assert apps_of_stored_messages(store) == sorted([id_a, id_b])


def test_the_command_line_asks_which_organisation_when_a_name_is_ambiguous(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("postbode.cli._store", lambda: store)
    runner = CliRunner()
    a = runner.invoke(cli, ["app", "create", "shop", "--org", "org-a", "--json"])
    assert a.exit_code == 0, a.output
    alone = runner.invoke(cli, ["app", "hold", "shop", "--reason", "checking"])
    assert alone.exit_code == 0, alone.output  # one organisation has it: no --org needed
    runner.invoke(cli, ["app", "release", "shop"])

    b = runner.invoke(cli, ["app", "create", "shop", "--org", "org-b", "--json"])
    assert b.exit_code == 0, b.output
    ambiguous = runner.invoke(cli, ["app", "hold", "shop", "--reason", "checking"])
    assert ambiguous.exit_code == 2
    assert "--org" in ambiguous.output and "several organizations" in ambiguous.output
    held = runner.invoke(cli, ["app", "hold", "shop", "--reason", "checking", "--org", "org-b"])
    assert held.exit_code == 0, held.output
    with store.read() as conn:
        holds = dict(
            conn.execute(
                select(organizations.c.name, apps.c.hold_reason)
                .join(apps, apps.c.organization_id == organizations.c.id)
                .where(apps.c.name == "shop")
            ).all()
        )
    assert holds == {"org-a": None, "org-b": "checking"}
    made = runner.invoke(cli, ["credential", "create", "--app", "shop", "--org", "org-a"])
    assert made.exit_code == 0, made.output
    assert runner.invoke(cli, ["credential", "list", "--app", "shop"]).exit_code == 2


# -- domain names ------------------------------------------------------------------------------


def test_claiming_a_held_domain_answers_as_a_fresh_one(
    api: TestClient, store: Store, org_a: tenancy.NewApp
) -> None:
    token_b = tenancy.create_org_token(store, "org-b")["token"]
    api.post("/api/v1/apps", json={"name": "shop"}, headers=bearer(token_b))
    held = api.post(
        "/api/v1/apps/shop/domains", json={"name": "shop.test"}, headers=bearer(token_b)
    )
    fresh = api.post(
        "/api/v1/apps/shop/domains", json={"name": "fresh.test"}, headers=bearer(token_b)
    )
    assert held.status_code == fresh.status_code == 201, held.text
    held_body, fresh_body = held.json(), fresh.json()
    assert held_body.keys() == fresh_body.keys()
    assert held_body["verified_at"] is None and held_body["dns_status"] == {}
    # Its own key under its own selector, not org A's
    selector_a = claim_of(store, "shop.test", org_a.app_id)["dkim_selector"]
    assert held_body["dkim_selector"] != selector_a
    # And the same shape of answer to both, in its list
    listed = api.get("/api/v1/apps/shop/domains", headers=bearer(token_b)).json()["data"]
    assert sorted(d["name"] for d in listed) == ["fresh.test", "shop.test"]


def test_another_organisations_claim_cannot_verify_send_or_sign(
    api: TestClient,
    store: Store,
    strict: Settings,
    dns: LoopbackDNS,
    org_a: tenancy.NewApp,
) -> None:
    b = tenancy.create_app(store, "shop", "org-b")
    tenancy.add_domain(store, "shop", "shop.test", organization="org-b")
    tenancy.add_domain(store, "shop", "fresh.test", organization="org-b")
    selector_a = claim_of(store, "shop.test", org_a.app_id)["dkim_selector"]

    # Org A's records are published, not org B's: its check finds its own DKIM key missing
    result = check(store, strict, dns, "shop.test", b.app_id)
    statuses = dnscheck.statuses(result.records)
    assert not result.verified and statuses["dkim"] == "missing"
    # Even with its own records published (say, the zone's owner tried both), it stays
    # pending while org A's claim is verified, and org A keeps the name
    publish(dns, claim_of(store, "shop.test", b.app_id), strict, ("dkim",))
    again = check(store, strict, dns, "shop.test", b.app_id)
    assert not again.verified and claim_of(store, "shop.test", b.app_id)["verified_at"] is None
    assert claim_of(store, "shop.test", org_a.app_id)["verified_at"] is not None
    # The store itself allows one verified claim per name, whoever writes
    with pytest.raises(IntegrityError), store.write() as conn:
        conn.execute(
            update(domains)
            .where(domains.c.name == "shop.test", domains.c.app_id == b.app_id)
            .values(verified_at=utcnow())
        )

    # Sending as it is refused as for any domain not verified yet, strictly or not
    refused = send(api, b.api_key, "orders@shop.test")
    unverified = send(api, b.api_key, "orders@fresh.test")
    assert refused.status_code == unverified.status_code == 422
    assert refused.json()["error"]["message"] == unverified.json()["error"]["message"].replace(
        "fresh.test", "shop.test"
    )
    assert send(api, org_a.api_key, "orders@shop.test").status_code == 202
    lenient = Acceptor(store, strict.smtp_hostname, allow_unverified=True)
    raw = b"From: orders@shop.test\r\nTo: alice@dest.test\r\nSubject: x\r\n\r\nx\r\n"
    with pytest.raises(Exception, match="is not verified yet"):
        lenient.check_authors(b.app_id, [raw.split(b"\r\n")[0]])
    assert lenient.check_authors(b.app_id, [b"From: orders@fresh.test"]) is False

    # Queued mail from the name (say, accepted before org A verified) is not signed with
    # org B's key; org A's is signed with org A's
    queued = [
        make_queued_message(store, a, ["bob@dest.test"])[1][0] for a in (org_a.app_id, b.app_id)
    ]
    outgoing = Outgoing(strict, store, cast(Any, None), "test")
    with store.read() as conn:
        rows = conn.execute(select(deliveries).where(deliveries.c.id.in_(queued))).all()
    keys = {j.row.app_id: j.signing_key for j in outgoing.load(rows)}
    assert keys[b.app_id] is None
    assert (keys[org_a.app_id].name, keys[org_a.app_id].dkim_selector) == ("shop.test", selector_a)


# -- where the name's mail goes -----------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


def _sent(store: Store, app_id: int) -> tuple[uuid.UUID, str]:
    """A delivered delivery of the app's: (id, VERP token)."""
    _, (delivery_id,) = make_queued_message(store, app_id, ["bob@dest.test"])
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(status="delivered", attempts=1)
        )
        token = conn.execute(
            select(deliveries.c.verp_token).where(deliveries.c.id == delivery_id)
        ).scalar_one()
    return delivery_id, str(token)


def _dsn(recipient: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.dest.test\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nNo.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n"
        f"\r\nFinal-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n--B--\r\n"
    ).encode()


def _status(store: Store, delivery_id: uuid.UUID) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                select(deliveries.c.status).where(deliveries.c.id == delivery_id)
            ).scalar_one()
        )


@pytest.mark.parametrize("development", [False, True], ids=["strict", "development"])
def test_bounces_and_inbound_mail_for_the_name_still_go_to_its_holder(
    store: Store,
    strict: Settings,
    org_a: tenancy.NewApp,
    loop: asyncio.AbstractEventLoop,
    development: bool,
) -> None:
    settings = strict.model_copy(
        update={"allow_unverified_domains": development, "webhook_allow_private": "127.0.0.0/8"}
    )
    b = tenancy.create_app(store, "shop", "org-b")
    for name in ("shop.test", "in.shop.test"):
        tenancy.add_domain(store, "shop", name, inbound=True, organization="org-b")
    route_a = routes.create_route(store, org_a.app_id, "support@in.shop.test", action="hold")
    # Org B may add a route of the same pattern to its own claim (nothing tells it about
    # org A's), but the listener takes only the holder's routes
    routes.create_route(store, b.app_id, "support@in.shop.test", action="hold")
    routes.create_route(store, b.app_id, "*@shop.test", action="hold")

    # Bounces at pb-bounces.shop.test: org A's delivery is bounced, org B's token is not
    # a return path of that name
    intake = BounceIntake(settings, store)
    a_delivery, a_token = _sent(store, org_a.app_id)
    b_delivery, b_token = _sent(store, b.app_id)
    refused = loop.run_until_complete(intake.check_recipient(f"{b_token}@pb-bounces.shop.test"))
    assert refused == "550 5.1.1 Unknown return path"
    reply = loop.run_until_complete(
        intake.receive("", [f"{a_token}@pb-bounces.shop.test"], _dsn("bob@dest.test"))
    )
    assert reply == "250 2.0.0 Ok: bounce recorded"
    assert (_status(store, a_delivery), _status(store, b_delivery)) == ("bounced", "delivered")

    # Inbound mail for in.shop.test goes to org A's route; shop.test takes none (org A's
    # claim of it is not inbound, org B's does not hold it)
    inbound = InboundIntake(settings, store)
    try:
        inbound.load()
        assert inbound.owns("support@in.shop.test") and not inbound.owns("x@shop.test")
        answer = loop.run_until_complete(
            inbound.receive(
                "carol@sender.test",
                ["support@in.shop.test"],
                b"From: carol@sender.test\r\nTo: support@in.shop.test\r\nSubject: Hi\r\n"
                b"Message-ID: <1@sender.test>\r\n\r\nHello.\r\n",
            )
        )
        assert answer.startswith("250"), answer
    finally:
        loop.run_until_complete(inbound.close())
    with store.read() as conn:
        stored = conn.execute(select(inbound_messages.c.app_id, inbound_messages.c.route_id)).all()
    assert [tuple(r) for r in stored] == [(org_a.app_id, route_a["id"])]
