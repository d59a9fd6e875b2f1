"""The live DNS check: verdicts per record, stored on the domain with an event on change,
against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from postbode import dnscheck, tenancy
from postbode.cli import app as cli
from postbode.config import Settings, get_settings
from postbode.dnscheck import DnsReader, Lookup, RecordCheck
from postbode.store.engine import Store
from postbode.store.schema import apps, domains, events
from postbode.testing.dns import LoopbackDNS
from postbode.testing.factories import make_app
from postbode.work import registry

SPF = "v=spf1 a:postbode.localhost ~all"
KEY = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx"


# -- verdicts (pure) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "status"),
    [
        (["v=spf1 a:postbode.localhost ~all"], "pass"),
        (["v=spf1 include:_spf.other.test +a:POSTBODE.localhost -all"], "pass"),
        (["google-site-verification=abc", "v=spf1 mx a:postbode.localhost ?all"], "pass"),
        ([], "missing"),
        (["google-site-verification=abc"], "missing"),
        (["v=spf10 a:postbode.localhost"], "missing"),
        (["v=spf1 mx -all"], "wrong"),
        (["v=spf1 -all a:postbode.localhost"], "wrong"),  # never reached: after "all"
        (["v=spf1 a:postbode.localhost ~all", "v=spf1 mx ~all"], "wrong"),  # two records
    ],
)
def test_spf(found: list[str], status: str) -> None:
    assert dnscheck.check_spf(SPF, found)[0] == status


@pytest.mark.parametrize(
    ("found", "status", "detail"),
    [
        ([KEY], "pass", "matches"),
        (["v=DKIM1;k=rsa;  p=MIIBIjANBgkqhkiG9w0B AQEFAAOCAQ8AMIIBCgKCAQEAx"], "pass", "matches"),
        (["k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx"], "pass", "matches"),
        ([], "missing", "no DKIM"),
        (["some text"], "missing", "no DKIM"),
        (["v=DKIM1; k=rsa; p="], "wrong", "revoked"),
        (["v=DKIM1; k=rsa; p=MIIBother"], "wrong", "not this domain's"),
        ([KEY, "v=DKIM1; p=MIIBother"], "wrong", "several"),
    ],
)
def test_dkim(found: list[str], status: str, detail: str) -> None:
    verdict = dnscheck.check_dkim(KEY, found)
    assert verdict[0] == status and detail in verdict[1]


def test_return_path_and_dmarc() -> None:
    want = "return.postbode.localhost"
    assert dnscheck.check_return_path(want, ["return.postbode.localhost"])[0] == "pass"
    assert dnscheck.check_return_path(want + ".", ["return.postbode.localhost"])[0] == "pass"
    wrong = dnscheck.check_return_path(want, ["bounces.other.test"])
    assert wrong == ("wrong", "points at bounces.other.test, not return.postbode.localhost")
    assert dnscheck.check_return_path(want, [])[0] == "missing"

    dmarc = "v=DMARC1; p=none; rua=mailto:d@shop.test"
    assert dnscheck.check_dmarc(dmarc, ["v=DMARC1; p=reject"]) == (
        "pass",
        "DMARC record found (policy p=reject)",
    )
    assert dnscheck.check_dmarc(dmarc, [])[0] == "missing"
    assert dnscheck.check_dmarc(dmarc, ["hello"])[0] == "wrong"
    assert dnscheck.check_dmarc(dmarc, ["v=DMARC1; p=none", "v=DMARC1; p=reject"])[0] == "wrong"


def _check(purpose: str, status: str, error: str | None = None) -> RecordCheck:
    return RecordCheck(purpose, "TXT", "n", "v", status, (), "", error)  # type: ignore[arg-type]


def test_verified_at_follows_dkim_and_return_path() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    earlier = now - timedelta(days=3)
    good = [_check("spf", "missing"), _check("dkim", "pass"), _check("return_path", "pass")]
    assert dnscheck.verified_at(good, None, now) == now
    assert dnscheck.verified_at(good, earlier, now) == earlier  # verified since then
    broken = [_check("dkim", "wrong"), _check("return_path", "pass")]
    assert dnscheck.verified_at(broken, earlier, now) is None
    unsure = [_check("dkim", "pass", error="SERVFAIL"), _check("return_path", "missing", "t/o")]
    assert dnscheck.verified_at(unsure, earlier, now) == earlier
    assert dnscheck.verified_at(unsure, None, now) is None


def test_a_dns_error_keeps_the_last_known_status() -> None:
    expected = [
        {"purpose": "spf", "type": "TXT", "name": "shop.test", "value": SPF},
        {"purpose": "dkim", "type": "TXT", "name": "s._domainkey.shop.test", "value": KEY},
    ]
    checks = dnscheck.evaluate(
        expected,
        [Lookup(error="SERVFAIL"), Lookup(error="timeout")],
        {"spf": "pass"},
    )
    assert [(c.status, c.error) for c in checks] == [("pass", "SERVFAIL"), ("missing", "timeout")]
    assert "last known status is kept" in checks[0].detail


# -- against a loopback DNS server, on both stores -------------------------------------------


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def domain(store: Store) -> dict[str, Any]:
    app = make_app(store)
    return tenancy.add_domain(store, app.name, "shop.test")


def publish(
    dns: LoopbackDNS, domain: dict[str, Any], settings: Settings, *, mx: bool = True
) -> None:
    for r in tenancy.dns_records(domain, settings.smtp_hostname, settings.return_path_domain):
        if r["type"] == "CNAME":
            dns.add_cname(r["name"], r["value"])
        elif r["type"] == "MX":
            if mx:
                preference, host = r["value"].split()
                dns.add_mx(r["name"], [(int(preference), host.rstrip("."))])
            else:
                dns.add_zone(r["name"].rpartition(".")[2])  # answered (NXDOMAIN), not refused
        else:
            dns.add_txt(r["name"], r["value"])  # the 2048-bit key: split in 255-byte strings


def check(store: Store, settings: Settings, dns: LoopbackDNS, **kw: Any) -> dnscheck.DomainCheck:
    reader = DnsReader(dns.nameserver, timeout=kw.pop("timeout", 2.0))
    return asyncio.run(dnscheck.check_domain(store, settings, "shop.test", reader=reader, **kw))


def changes(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [
            dict(r.data)
            for r in conn.execute(
                select(events.c.data)
                .where(events.c.type == "domain.dns_changed")
                .order_by(events.c.id)
            )
        ]


def test_published_records_pass_and_verify_the_domain(
    store: Store, settings: Settings, dns: LoopbackDNS, domain: dict[str, Any]
) -> None:
    dns.add_txt("shop.test", "google-site-verification=abc")
    publish(dns, domain, settings)
    result = check(store, settings, dns)
    assert [(c.purpose, c.status) for c in result.records] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("return_path", "pass"),
        ("return_path_mx", "pass"),
        ("dmarc", "pass"),
    ]
    assert result.verified and result.all_pass and result.changed
    dkim = result.records[1]
    assert dkim.found == (domain["dkim_public_key"],)  # the split strings joined again
    with store.read() as conn:
        row = conn.execute(select(domains).where(domains.c.name == "shop.test")).one()
    assert row.dns_status == dict.fromkeys(dnscheck.PURPOSES, "pass")
    assert row.verified_at == row.dns_checked_at == result.checked_at
    assert changes(store) == [
        {
            "domain": "shop.test",
            "before": {},
            "after": dict.fromkeys(dnscheck.PURPOSES, "pass"),
            "verified": True,
        }
    ]
    again = check(store, settings, dns)  # nothing changed: no new event, still verified since
    assert not again.changed and again.verified_at == result.verified_at
    assert len(changes(store)) == 1


def test_missing_and_wrong_records_are_told_apart(
    store: Store, settings: Settings, dns: LoopbackDNS, domain: dict[str, Any]
) -> None:
    publish(dns, domain, settings)
    assert check(store, settings, dns).verified
    dns.remove(f"{domain['dkim_selector']}._domainkey.shop.test")
    dns.remove("pb-bounces.shop.test")
    dns.add_cname("pb-bounces.shop.test", "bounces.elsewhere.test")
    dns.remove("_dmarc.shop.test")
    result = check(store, settings, dns)
    by = {c.purpose: c for c in result.records}
    assert by["dkim"].status == "missing"
    assert by["return_path"].status == "wrong"
    assert by["return_path"].found == ("bounces.elsewhere.test",)
    assert by["dmarc"].status == "missing" and by["spf"].status == "pass"
    assert not result.verified and not result.all_pass
    last = changes(store)[-1]
    assert last["before"]["dkim"] == "pass" and last["after"]["dkim"] == "missing"
    assert last["verified"] is False


def test_dns_failures_keep_the_domain_verified(
    store: Store, settings: Settings, dns: LoopbackDNS, domain: dict[str, Any]
) -> None:
    publish(dns, domain, settings)
    first = check(store, settings, dns)
    dns.servfail(f"{domain['dkim_selector']}._domainkey.shop.test")
    dns.timeout("_dmarc.shop.test")
    result = check(store, settings, dns, timeout=0.5)
    by = {c.purpose: c for c in result.records}
    assert by["dkim"].status == "pass" and by["dkim"].error is not None
    assert by["dmarc"].status == "pass" and "in time" in (by["dmarc"].error or "")
    assert result.verified_at == first.verified_at and not result.changed


def test_the_return_path_domains_mx_is_checked_again_periodically(
    store: Store, settings: Settings, dns: LoopbackDNS, domain: dict[str, Any]
) -> None:
    """Bounces come back to <token>@<return-path domain>: its MX must name Postbode. The
    domains.dns_check task looks it up with the rest; a missing record, a wrong one and a
    failing lookup are three different things."""
    settings = settings.model_copy(update={"dns_nameservers": dns.nameserver})
    (task,) = [t for t in registry(settings).tasks if t.name == "domains.dns_check"]
    rp = settings.return_path_domain
    publish(dns, domain, settings, mx=False)
    task.run(store)
    result = check(store, settings, dns)
    by = {c.purpose: c for c in result.records}
    mx = by["return_path_mx"]
    assert (mx.type, mx.name, mx.expected) == ("MX", rp, f"10 {settings.smtp_hostname}.")
    assert mx.status == "missing" and mx.error is None
    assert mx.detail == f"no MX record (it should name {settings.smtp_hostname})"
    # Verification is DKIM and the return-path CNAME; the MX is reported beside them.
    assert result.verified and not result.all_pass
    assert changes(store)[-1]["after"]["return_path_mx"] == "missing"

    dns.add_mx(rp, [(10, "mx.elsewhere.test")])
    task.run(store)
    assert changes(store)[-1]["after"]["return_path_mx"] == "wrong"
    with store.read() as conn:
        stored = conn.execute(select(domains.c.dns_status)).scalar_one()
    assert stored["return_path_mx"] == "wrong"

    dns.remove(rp)
    dns.add_mx(rp, [(20, "backup.elsewhere.test"), (10, settings.smtp_hostname)])
    task.run(store)
    last = changes(store)[-1]
    assert (last["before"]["return_path_mx"], last["after"]["return_path_mx"]) == ("wrong", "pass")
    result = check(store, settings, dns)
    assert result.all_pass and not result.changed

    # SERVFAIL is not "missing": the last known status stays, with the error, and no event.
    dns.servfail(rp, "MX")
    events_before = len(changes(store))
    task.run(store)
    result = check(store, settings, dns, timeout=0.5)
    mx = {c.purpose: c for c in result.records}["return_path_mx"]
    assert mx.status == "pass" and mx.error is not None and "SERVFAIL" in mx.error
    assert mx.detail.startswith("DNS error:")
    assert len(changes(store)) == events_before


def test_unknown_domain(store: Store, settings: Settings, dns: LoopbackDNS) -> None:
    with pytest.raises(tenancy.TenancyError, match="no domain"):
        check(store, settings, dns)


def test_cli_domain_check(
    store: Store,
    settings: Settings,
    dns: LoopbackDNS,
    domain: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("postbode.cli._store", lambda: store)  # no second engine to leak
    monkeypatch.setenv("POSTBODE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("POSTBODE_DNS_NAMESERVERS", dns.nameserver)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        failing = runner.invoke(cli, ["domain", "check", "shop.test", "--json"])
        assert failing.exit_code == 1, failing.output
        body = json.loads(failing.stdout)
        assert body["verified"] is False
        assert {r["status"] for r in body["records"]} == {"missing"}
        publish(dns, domain, settings)
        passing = runner.invoke(cli, ["domain", "check", "SHOP.test."])
        assert passing.exit_code == 0, passing.output
        assert "verified" in passing.stdout and "pass" in passing.stdout
        unknown = runner.invoke(cli, ["domain", "check", "nope.test"])
        assert unknown.exit_code == 2 and "no domain" in unknown.stderr
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("found", "status"),
    [
        ([], "missing"),
        (["10 mta.postbode.test"], "pass"),
        (["10 mta.postbode.test", "20 backup.shop.test"], "pass"),
        (["10 mx.elsewhere.test"], "wrong"),
        (["0 ."], "wrong"),
    ],
)
def test_mx_of_an_inbound_domain(found: list[str], status: str) -> None:
    assert dnscheck.check_mx("10 mta.postbode.test.", found)[0] == status


def test_an_inbound_domain_has_its_mx_checked(
    store: Store, settings: Settings, dns: LoopbackDNS, domain: dict[str, Any]
) -> None:
    publish(dns, domain, settings)
    with store.read() as conn:
        app_name = conn.execute(
            select(apps.c.name).where(apps.c.id == domain["app_id"])
        ).scalar_one()
    tenancy.add_domain(store, app_name, "shop.test", inbound=True)
    result = check(store, settings, dns)
    by = {c.purpose: c for c in result.records}
    assert by["inbound"].status == "missing"
    dns.add_mx("shop.test", [(10, settings.smtp_hostname)])
    result = check(store, settings, dns)
    by = {c.purpose: c for c in result.records}
    assert by["inbound"].status == "pass" and result.all_pass
    assert changes(store)[-1]["after"]["inbound"] == "pass"
