"""MX resolution (RFC 5321 §5.1, RFC 7505) against a real loopback DNS server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from postbode.config import Settings
from postbode.delivery.mx import (
    DnsFailure,
    DnsHardFail,
    DnsSoftFail,
    MxLookup,
    MxResolver,
    Target,
    TransportRoute,
    order_mx,
    parse_nameservers,
    parse_transport_map,
    route_for,
    to_ascii_domain,
)
from postbode.testing.dns import LoopbackDNS

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def resolver(dns: LoopbackDNS, clock: Clock) -> MxResolver:
    return MxResolver(dns.nameserver, "", timeout=2.0, clock=clock, rng=random.Random(5))


def addresses(targets: list[Target]) -> list[tuple[str, str, int, int]]:
    return [(t.host, t.ip, t.port, t.preference) for t in targets]


# -- MX lookup -----------------------------------------------------------------------------


def test_mx_hosts_in_preference_order_expanded_to_addresses(
    dns: LoopbackDNS, resolver: MxResolver
) -> None:
    dns.add_mx("dest.test", [(20, "mx2.dest.test"), (10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2", "127.0.0.3")
    dns.add_aaaa("mx1.dest.test", "::1")
    dns.add_a("mx2.dest.test", "127.0.0.4")

    targets = run(resolver.resolve("dest.test"))

    assert addresses(targets) == [
        ("mx1.dest.test", "127.0.0.2", 25, 10),
        ("mx1.dest.test", "127.0.0.3", 25, 10),
        ("mx1.dest.test", "::1", 25, 10),  # IPv4 first, then IPv6, per host
        ("mx2.dest.test", "127.0.0.4", 25, 20),
    ]
    assert {t.source for t in targets} == {"mx"}
    assert str(targets[0]) == "mx1.dest.test[127.0.0.2]:25"


def test_prefer_ipv6(dns: LoopbackDNS) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    dns.add_aaaa("mx1.dest.test", "::1")
    resolver = MxResolver(dns.nameserver, timeout=2.0, prefer_ipv6=True)
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["::1", "127.0.0.2"]


def test_equal_preferences_are_tried_in_random_order(
    dns: LoopbackDNS, resolver: MxResolver
) -> None:
    dns.add_mx("dest.test", [(10, "a.dest.test"), (10, "b.dest.test"), (5, "first.dest.test")])
    for host, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("first", "127.0.0.4")):
        dns.add_a(f"{host}.dest.test", ip)

    async def orders() -> set[tuple[str, ...]]:
        return {tuple(t.host for t in await resolver.resolve("dest.test")) for _ in range(40)}

    assert run(orders()) == {
        ("first.dest.test", "a.dest.test", "b.dest.test"),
        ("first.dest.test", "b.dest.test", "a.dest.test"),
    }


def test_implicit_mx_when_the_domain_has_no_mx(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_a("dest.test", "127.0.0.2")
    dns.add_aaaa("dest.test", "::1")
    dns.add_txt("dest.test", "v=spf1 -all")

    targets = run(resolver.resolve("dest.test"))

    assert addresses(targets) == [
        ("dest.test", "127.0.0.2", 25, 0),
        ("dest.test", "::1", 25, 0),
    ]
    assert {t.source for t in targets} == {"implicit"}


def test_no_mx_and_no_address_is_a_hard_failure(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_txt("dest.test", "v=spf1 -all")
    with pytest.raises(DnsHardFail) as info:
        run(resolver.resolve("dest.test"))
    assert info.value.status == "5.4.4"
    assert "no MX and no address records" in info.value.reason


def test_null_mx_is_a_hard_failure(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_null_mx("nomail.test")
    dns.add_a("nomail.test", "127.0.0.2")  # RFC 7505 §4.1: no implicit MX fallback either
    with pytest.raises(DnsHardFail) as info:
        run(resolver.resolve("nomail.test"))
    assert info.value.status == "5.1.10"
    assert "null MX" in info.value.reason
    assert info.value.permanent
    assert str(info.value).startswith("5.1.10 nomail.test accepts no mail")


def test_null_mx_beside_real_mx_is_skipped(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_null_mx("dest.test")
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    assert [t.host for t in run(resolver.resolve("dest.test"))] == ["mx1.dest.test"]


def test_nxdomain_is_a_hard_failure(dns: LoopbackDNS, resolver: MxResolver) -> None:
    with pytest.raises(DnsHardFail) as info:
        run(resolver.resolve("nowhere.test"))
    assert info.value.status == "5.1.2"
    assert "NXDOMAIN" in info.value.reason


def test_servfail_is_a_soft_failure(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.servfail("dest.test", "MX")
    with pytest.raises(DnsSoftFail) as info:
        run(resolver.resolve("dest.test"))
    assert info.value.status == "4.4.3"
    assert not info.value.permanent
    assert "SERVFAIL" in info.value.reason


def test_timeout_is_a_soft_failure(dns: LoopbackDNS) -> None:
    dns.timeout("slow.test")
    resolver = MxResolver(dns.nameserver, timeout=0.3)
    with pytest.raises(DnsSoftFail) as info:
        run(resolver.resolve("slow.test"))
    assert info.value.status == "4.4.3"
    assert "timed out" in info.value.reason


def test_a_broken_nameserver_is_skipped_for_the_next(dns: LoopbackDNS) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    with LoopbackDNS() as broken:
        for name in ("dest.test", "mx1.dest.test"):
            broken.servfail(name)
        resolver = MxResolver(f"{broken.nameserver},{dns.nameserver}", timeout=2.0)
        assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]
        assert broken.query_count("dest.test", "MX") >= 1


# -- MX hosts ------------------------------------------------------------------------------


def test_an_unusable_mx_host_is_skipped(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx(
        "dest.test",
        [(5, "gone.dest.test"), (10, "flaky.dest.test"), (20, "mx3.dest.test")],
    )
    dns.servfail("flaky.dest.test")
    dns.add_a("mx3.dest.test", "127.0.0.4")
    assert [t.host for t in run(resolver.resolve("dest.test"))] == ["mx3.dest.test"]


def test_mx_hosts_that_do_not_exist_are_a_hard_failure(
    dns: LoopbackDNS, resolver: MxResolver
) -> None:
    dns.add_mx("dest.test", [(10, "gone.dest.test"), (20, "empty.dest.test")])
    dns.add_txt("empty.dest.test", "no addresses here")
    with pytest.raises(DnsHardFail) as info:
        run(resolver.resolve("dest.test"))
    assert info.value.status == "5.4.4"
    assert "no usable MX host" in info.value.reason
    assert "gone.dest.test: host does not exist" in info.value.reason
    assert "empty.dest.test: no A or AAAA records" in info.value.reason


def test_mx_hosts_failing_softly_make_a_soft_failure(
    dns: LoopbackDNS, resolver: MxResolver
) -> None:
    dns.add_mx("dest.test", [(10, "gone.dest.test"), (20, "flaky.dest.test")])
    dns.servfail("flaky.dest.test")
    with pytest.raises(DnsSoftFail) as info:
        run(resolver.resolve("dest.test"))
    assert "flaky.dest.test" in info.value.reason


def test_one_address_family_failing_does_not_matter(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    dns.servfail("mx1.dest.test", "AAAA")
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]


def test_an_mx_that_is_a_cname_is_followed(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mail.dest.test")])
    dns.add_cname("mail.dest.test", "real-mx.hoster.test")
    dns.add_a("real-mx.hoster.test", "127.0.0.7")
    [target] = run(resolver.resolve("dest.test"))
    # The MX name stays the host (it is what the TLS certificate is checked against).
    assert (target.host, target.ip) == ("mail.dest.test", "127.0.0.7")


def test_a_domain_that_is_a_cname_is_followed(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_cname("alias.test", "dest.test")
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    assert [t.host for t in run(resolver.resolve("alias.test"))] == ["mx1.dest.test"]


def test_an_mx_that_is_an_ip_literal_is_tolerated(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "127.0.0.9")])
    [target] = run(resolver.resolve("dest.test"))
    assert (target.host, target.ip) == ("127.0.0.9", "127.0.0.9")
    assert dns.query_count(rtype="A") == 0


def test_the_same_address_is_listed_once(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test"), (20, "mx2.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    dns.add_a("mx2.dest.test", "127.0.0.2", "127.0.0.3")
    assert addresses(run(resolver.resolve("dest.test"))) == [
        ("mx1.dest.test", "127.0.0.2", 25, 10),
        ("mx2.dest.test", "127.0.0.3", 25, 20),
    ]


def test_internationalised_domain_is_looked_up_as_punycode(
    dns: LoopbackDNS, resolver: MxResolver
) -> None:
    dns.add_mx("xn--bcher-kva.test", [(10, "mx.xn--bcher-kva.test")])
    dns.add_a("mx.xn--bcher-kva.test", "127.0.0.2")
    [target] = run(resolver.resolve("Bücher.test"))
    assert target.host == "mx.xn--bcher-kva.test"
    assert dns.query_count("xn--bcher-kva.test", "MX") == 1


def test_address_literal_domain(resolver: MxResolver, dns: LoopbackDNS) -> None:
    [v4] = run(resolver.resolve("[127.0.0.5]"))
    [v6] = run(resolver.resolve("[IPv6:::1]"))
    assert (v4.ip, v4.port, v4.source) == ("127.0.0.5", 25, "literal")
    assert v6.ip == "::1"
    assert dns.queries == []
    with pytest.raises(DnsHardFail):
        run(resolver.resolve("[not-an-ip]"))


@pytest.mark.parametrize("bad", ["", "dest..test", "a" * 64 + ".test", "-\x00.test"])
def test_invalid_domains_are_hard_failures(resolver: MxResolver, bad: str) -> None:
    with pytest.raises(DnsHardFail) as info:
        run(resolver.resolve(bad))
    assert info.value.status == "5.1.2"


# -- cache ---------------------------------------------------------------------------------


def test_answers_are_cached_for_their_ttl(
    dns: LoopbackDNS, resolver: MxResolver, clock: Clock
) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")], ttl=300)
    dns.add_a("mx1.dest.test", "127.0.0.2", ttl=60)

    run(resolver.resolve("dest.test"))
    run(resolver.resolve("dest.test"))
    assert dns.query_count("dest.test", "MX") == 1
    assert dns.query_count("mx1.dest.test", "A") == 1

    dns.remove("mx1.dest.test", "A")
    dns.add_a("mx1.dest.test", "127.0.0.3")
    clock.advance(59)
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]
    clock.advance(2)  # past the A record's TTL, within the MX record's
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.3"]
    assert dns.query_count("dest.test", "MX") == 1
    assert dns.query_count("mx1.dest.test", "A") == 2


def test_ttl_zero_is_not_cached(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")], ttl=0)
    dns.add_a("mx1.dest.test", "127.0.0.2")
    run(resolver.resolve("dest.test"))
    run(resolver.resolve("dest.test"))
    assert dns.query_count("dest.test", "MX") == 2


def test_negative_answers_are_cached_for_the_soa_minimum(
    dns: LoopbackDNS, resolver: MxResolver, clock: Clock
) -> None:
    dns.add_a("implicit.test", "127.0.0.2")  # NODATA for MX
    for _ in range(2):
        run(resolver.resolve("implicit.test"))
        with pytest.raises(DnsHardFail):
            run(resolver.resolve("nowhere.test"))
    assert dns.query_count("implicit.test", "MX") == 1
    assert dns.query_count("nowhere.test", "MX") == 1

    dns.add_mx("nowhere.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    clock.advance(61)  # LoopbackDNS's SOA minimum is 60 s (RFC 2308 §5)
    assert [t.host for t in run(resolver.resolve("nowhere.test"))] == ["mx1.dest.test"]


def test_soft_failures_are_not_cached(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    dns.servfail("dest.test")
    with pytest.raises(DnsSoftFail):
        run(resolver.resolve("dest.test"))
    dns.heal("dest.test")
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]


def test_concurrent_lookups_share_one_question(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")

    async def many() -> list[list[Target]]:
        return await asyncio.gather(*(resolver.resolve("dest.test") for _ in range(20)))

    results = run(many())
    assert all([t.ip for t in r] == ["127.0.0.2"] for r in results)
    assert dns.query_count("dest.test", "MX") == 1
    assert dns.query_count("mx1.dest.test", "A") == 1


def test_cache_is_bounded(dns: LoopbackDNS, clock: Clock) -> None:
    for i in range(5):
        dns.add_a(f"d{i}.test", "127.0.0.2")
    resolver = MxResolver(dns.nameserver, timeout=2.0, clock=clock, max_cache_entries=4)

    async def all_domains() -> None:
        for i in range(5):
            await resolver.resolve(f"d{i}.test")

    run(all_domains())  # 15 answers (MX, A, AAAA per domain) through a 4-entry cache
    dns.clear_queries()
    run(resolver.resolve("d4.test"))
    run(resolver.resolve("d0.test"))
    assert dns.query_count("d4.test") == 0  # still cached
    assert dns.query_count("d0.test") == 3  # evicted


def test_resolver_survives_successive_event_loops(dns: LoopbackDNS, resolver: MxResolver) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")], ttl=0)
    dns.add_a("mx1.dest.test", "127.0.0.2", ttl=0)
    for _ in range(3):
        assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]


# -- transport map -------------------------------------------------------------------------


def test_transport_map_bypasses_mx(dns: LoopbackDNS) -> None:
    dns.add_a("relay.corp.test", "127.0.0.8")
    resolver = MxResolver(
        dns.nameserver,
        "example.test=127.0.0.1:2600, *.corp.test=[::1]:2601,named.test=relay.corp.test:2525",
        timeout=2.0,
    )
    [exact] = run(resolver.resolve("Example.Test"))
    [sub] = run(resolver.resolve("a.b.corp.test"))
    [named] = run(resolver.resolve("named.test"))
    assert (exact.host, exact.ip, exact.port, exact.source) == (
        "127.0.0.1",
        "127.0.0.1",
        2600,
        "transport",
    )
    assert (sub.ip, sub.port) == ("::1", 2601)
    assert (named.host, named.ip, named.port) == ("relay.corp.test", "127.0.0.8", 2525)
    # Only the named next hop was looked up, and never by MX.
    assert {q.name for q in dns.queries} == {"relay.corp.test"}
    assert dns.query_count(rtype="MX") == 0
    # The apex of a wildcard is not covered: corp.test goes through MX (and does not exist).
    with pytest.raises(DnsHardFail):
        run(resolver.resolve("corp.test"))


def test_parse_transport_map() -> None:
    routes = parse_transport_map(
        " example.test=127.0.0.1:2600 ,*.corp.test=127.0.0.1:2601\n"
        "v6.test=[::1]:2602, plain.test=127.0.0.3, *.Bücher.test=[::1], *=127.0.0.1:2525,"
    )
    assert routes == (
        TransportRoute("example.test", "127.0.0.1", 2600),
        TransportRoute("*.corp.test", "127.0.0.1", 2601),
        TransportRoute("v6.test", "::1", 2602),
        TransportRoute("plain.test", "127.0.0.3", 25),
        TransportRoute("*.xn--bcher-kva.test", "::1", 25),
        TransportRoute("*", "127.0.0.1", 2525),
    )
    assert parse_transport_map("") == ()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("example.test", "not domain=host:port"),
        ("=127.0.0.1:25", "not domain=host:port"),
        ("example.test=", "not domain=host:port"),
        ("example.test=127.0.0.1:0", "bad port"),
        ("example.test=127.0.0.1:http", "bad port"),
        ("example.test=[::1:25", "bad address"),
        ("a.test=127.0.0.1:25,A.test=127.0.0.2:25", "twice"),
        ("bad..test=127.0.0.1:25", "invalid domain"),
    ],
)
def test_parse_transport_map_errors(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_transport_map(text)


def test_route_for_precedence() -> None:
    routes = parse_transport_map(
        "*=127.0.0.1:1,*.test=127.0.0.1:2,*.corp.test=127.0.0.1:3,corp.test=127.0.0.1:4"
    )

    def port(domain: str) -> int | None:
        route = route_for(routes, domain)
        return route.port if route else None

    assert port("corp.test") == 4  # exact beats every wildcard
    assert port("a.corp.test") == 3  # the longest wildcard wins
    assert port("x.test") == 2
    assert port("example.org") == 1
    assert route_for(parse_transport_map("*.corp.test=127.0.0.1:3"), "corp.test") is None
    assert route_for(parse_transport_map("*.corp.test=127.0.0.1:3"), "xcorp.test") is None


# -- pure helpers --------------------------------------------------------------------------


def test_parse_nameservers() -> None:
    assert parse_nameservers("127.0.0.1:5353, 127.0.0.2,[::1]:5300,::1") == [
        ("127.0.0.1", 5353),
        ("127.0.0.2", 53),
        ("::1", 5300),
        ("::1", 53),
    ]
    assert parse_nameservers("") == []
    with pytest.raises(ValueError, match="not an IP address"):
        parse_nameservers("ns1.dest.test:53")
    with pytest.raises(ValueError, match="bad port"):
        parse_nameservers("127.0.0.1:99999")


def test_order_mx() -> None:
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "a"), (0, "z")]
    seen = {tuple(order_mx(records, random.Random(seed))) for seed in range(50)}
    assert seen == {
        ((0, "z"), (10, "a"), (10, "b"), (20, "c")),
        ((0, "z"), (10, "b"), (10, "a"), (20, "c")),
    }


@pytest.mark.parametrize(
    ("given", "ascii_form"),
    [
        ("Dest.Test.", "dest.test"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test", "xn--bcher-kva.test"),  # UTS #46 maps case first
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        (" dest.test ", "dest.test"),
    ],
)
def test_to_ascii_domain(given: str, ascii_form: str) -> None:
    assert to_ascii_domain(given) == ascii_form


def test_failures_are_typed() -> None:
    hard, soft = DnsHardFail("gone", "5.1.2"), DnsSoftFail("later", "4.4.3")
    assert isinstance(hard, DnsFailure) and isinstance(soft, DnsFailure)
    assert hard.permanent and not soft.permanent
    assert (soft.reason, soft.status, str(soft)) == ("later", "4.4.3", "4.4.3 later")


def test_from_settings(dns: LoopbackDNS) -> None:
    dns.add_mx("dest.test", [(10, "mx1.dest.test")])
    dns.add_a("mx1.dest.test", "127.0.0.2")
    settings = Settings(dns_nameservers=dns.nameserver, transport_map="x.test=127.0.0.1:2600")
    resolver: MxLookup = MxResolver.from_settings(settings, timeout=2.0)
    assert [t.ip for t in run(resolver.resolve("dest.test"))] == ["127.0.0.2"]
    assert [t.port for t in run(resolver.resolve("x.test"))] == [2600]
