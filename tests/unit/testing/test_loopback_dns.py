"""The loopback DNS server answers each record type and scripted failure over real UDP and TCP."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postbode.testing.dns import LoopbackDNS, split_txt

TRANSPORTS = ["udp", "tcp"]


@pytest.fixture
def server() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as d:
        yield d


def ask(server: LoopbackDNS, name: str, rtype: str, transport: str) -> dns.message.Message:
    host, port = server.address
    query = dns.message.make_query(name, rtype)
    if transport == "udp":
        return dns.query.udp(query, host, port=port, timeout=5)
    return dns.query.tcp(query, host, port=port, timeout=5)


def answers(response: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in response.answer for rr in rrset]


@pytest.fixture(scope="module")
def dkim_public_key() -> str:
    """The p= value of a real 2048-bit DKIM key (RFC 6376 §3.6.1)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mx_a_aaaa(server: LoopbackDNS, transport: str) -> None:
    server.add_mx("dest.test", [(10, "mx1.dest.test"), (20, "MX2.Dest.Test.")], ttl=120)
    server.add_a("mx1.dest.test", "127.0.0.2", "127.0.0.3")
    server.add_aaaa("mx2.dest.test", "::1")

    mx = ask(server, "dest.test", "MX", transport)
    assert sorted(answers(mx)) == ["10 mx1.dest.test.", "20 mx2.dest.test."]
    assert mx.answer[0].ttl == 120
    assert mx.flags & dns.flags.AA
    assert sorted(answers(ask(server, "MX1.dest.test", "A", transport))) == [
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert answers(ask(server, "mx2.dest.test", "AAAA", transport)) == ["::1"]
    first = server.queries[0]
    assert (first.name, first.rtype, first.transport) == ("dest.test", "MX", transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_null_mx(server: LoopbackDNS, transport: str) -> None:
    server.add_null_mx("nomail.test")
    [rr] = ask(server, "nomail.test", "MX", transport).answer[0]
    assert rr.preference == 0 and rr.exchange.to_text() == "."


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cname_is_chased(server: LoopbackDNS, transport: str) -> None:
    server.add_cname("mail.dest.test", "relay.dest.test")
    server.add_cname("relay.dest.test", "mx1.dest.test")
    server.add_a("mx1.dest.test", "127.0.0.2")
    response = ask(server, "mail.dest.test", "A", transport)
    assert answers(response) == ["relay.dest.test.", "mx1.dest.test.", "127.0.0.2"]
    assert answers(ask(server, "mail.dest.test", "CNAME", transport)) == ["relay.dest.test."]


def test_cname_must_stand_alone(server: LoopbackDNS) -> None:
    server.add_cname("alias.dest.test", "dest.test")
    with pytest.raises(ValueError, match="CNAME"):
        server.add_a("alias.dest.test", "127.0.0.2")
    server.add_a("host.dest.test", "127.0.0.2")
    with pytest.raises(ValueError, match="CNAME"):
        server.add_cname("host.dest.test", "dest.test")


def test_long_txt_is_split_and_big_answers_fall_back_to_tcp(
    server: LoopbackDNS, dkim_public_key: str
) -> None:
    value = f"v=DKIM1; k=rsa; p={dkim_public_key}"
    assert len(value) > 255
    server.add_txt("sel._domainkey.shop.test", value)
    server.add_txt("sel._domainkey.shop.test", "v=spf1 -all")
    server.add_txt("sel._domainkey.shop.test", ["two", "strings"])

    # Over UDP the answer exceeds 512 bytes: truncated, with the question kept.
    udp = ask(server, "sel._domainkey.shop.test", "TXT", "udp")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = ask(server, "sel._domainkey.shop.test", "TXT", "tcp")
    strings = sorted((rr.strings for rr in tcp.answer[0]), key=len)
    assert (b"v=spf1 -all",) in strings and (b"two", b"strings") in strings
    [long] = [s for s in strings if s[0].startswith(b"v=DKIM1")]
    assert [len(s) for s in long] == [255, len(value) - 255]
    assert b"".join(long).decode() == value

    # A stub resolver retries over TCP by itself (RFC 7766 §5).
    resolver = stub(server)
    texts = [b"".join(rr.strings) for rr in resolver.resolve("sel._domainkey.shop.test", "TXT")]
    assert value.encode() in texts
    assert [q.transport for q in server.queries][-2:] == ["udp", "tcp"]


def test_split_txt() -> None:
    assert split_txt("") == [b""]
    assert split_txt("a" * 256) == [b"a" * 255, b"a"]
    with LoopbackDNS() as d, pytest.raises(ValueError, match="255"):
        d.add_txt("x.test", [b"a" * 256])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nxdomain_nodata_and_empty_non_terminals(server: LoopbackDNS, transport: str) -> None:
    server.add_a("mx1.dest.test", "127.0.0.2")

    missing = ask(server, "nothing.dest.test", "A", transport)
    assert missing.rcode() == dns.rcode.NXDOMAIN
    # RFC 2308 §3: the SOA carries the negative TTL.
    [soa] = missing.authority[0]
    assert missing.authority[0].rdtype == dns.rdatatype.SOA and soa.minimum == 60

    nodata = ask(server, "mx1.dest.test", "MX", transport)
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA

    # dest.test has no records but a name below it: it exists (RFC 8020 §2).
    ent = ask(server, "dest.test", "MX", transport)
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer

    assert ask(server, "other.test", "A", transport).rcode() == dns.rcode.NXDOMAIN
    # Not authoritative for anything outside the declared zones.
    assert ask(server, "example.com", "A", transport).rcode() == dns.rcode.REFUSED


def test_zones_follow_added_names(server: LoopbackDNS) -> None:
    server.add_a("host.example", "127.0.0.9")
    server.add_zone("corp.internal")
    assert ask(server, "nope.example", "A", "udp").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, "nope.corp.internal", "A", "udp").rcode() == dns.rcode.NXDOMAIN
    assert ask(server, "nope.internal", "A", "udp").rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_scripted_failures(server: LoopbackDNS, transport: str) -> None:
    server.add_mx("dest.test", [(10, "mx1.dest.test")])
    server.add_a("dest.test", "127.0.0.2")
    server.servfail("dest.test", "MX")
    server.refuse("refused.test")
    server.nxdomain("gone.test")
    server.add_a("gone.test", "127.0.0.2")

    assert ask(server, "dest.test", "MX", transport).rcode() == dns.rcode.SERVFAIL
    assert answers(ask(server, "dest.test", "A", transport)) == ["127.0.0.2"]  # only MX fails
    assert ask(server, "refused.test", "A", transport).rcode() == dns.rcode.REFUSED
    assert ask(server, "gone.test", "A", transport).rcode() == dns.rcode.NXDOMAIN

    server.heal("dest.test")
    assert answers(ask(server, "dest.test", "MX", transport)) == ["10 mx1.dest.test."]
    server.servfail("dest.test")
    assert ask(server, "dest.test", "A", transport).rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_never_answers(server: LoopbackDNS, transport: str) -> None:
    server.timeout("slow.test")
    host, port = server.address
    query = dns.message.make_query("slow.test", "A")
    with pytest.raises(dns.exception.Timeout):
        if transport == "udp":
            dns.query.udp(query, host, port=port, timeout=0.3)
        else:
            dns.query.tcp(query, host, port=port, timeout=0.3)
    assert server.query_count("slow.test") == 1


def test_stop_releases_held_tcp_connections_and_threads() -> None:
    before = threading.active_count()
    server = LoopbackDNS().start()
    server.timeout("slow.test")
    host, port = server.address
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(dns.message.make_query("slow.test", "A"), host, port=port, timeout=0.2)
    server.stop()
    assert threading.active_count() == before
    with pytest.raises(RuntimeError):
        _ = server.address


def test_records_change_while_running(server: LoopbackDNS) -> None:
    server.add_a("mx1.dest.test", "127.0.0.2")
    assert answers(ask(server, "mx1.dest.test", "A", "udp")) == ["127.0.0.2"]
    server.remove("mx1.dest.test", "A")
    server.add_a("mx1.dest.test", "127.0.0.4")
    assert answers(ask(server, "mx1.dest.test", "A", "udp")) == ["127.0.0.4"]
    server.remove("mx1.dest.test")
    assert ask(server, "mx1.dest.test", "A", "udp").rcode() == dns.rcode.NXDOMAIN


def test_internationalised_names_arrive_as_punycode(server: LoopbackDNS) -> None:
    server.add_mx("xn--bcher-kva.test", [(10, "mx.xn--bcher-kva.test")])
    result = stub(server).resolve("bücher.test", "MX")
    assert [rr.exchange.to_text() for rr in result] == ["mx.xn--bcher-kva.test."]
    assert server.query_count("xn--bcher-kva.test", "MX") == 1


def test_query_log(server: LoopbackDNS) -> None:
    server.add_a("a.test", "127.0.0.2")
    ask(server, "a.test", "A", "udp")
    ask(server, "a.test", "AAAA", "tcp")
    assert server.query_count() == 2
    assert server.query_count("A.TEST.", "a") == 1
    assert server.query_count(rtype="AAAA") == 1
    server.clear_queries()
    assert server.queries == []


def test_nameserver_string(server: LoopbackDNS) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.nameserver == f"127.0.0.1:{port}"


def test_ipv6_loopback() -> None:
    try:
        server = LoopbackDNS(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        server.add_aaaa("v6.test", "::1")
        assert server.nameserver.startswith("[::1]:")
        assert answers(ask(server, "v6.test", "AAAA", "udp")) == ["::1"]
        assert answers(ask(server, "v6.test", "AAAA", "tcp")) == ["::1"]
    finally:
        server.stop()


def stub(server: LoopbackDNS) -> dns.resolver.Resolver:
    """A dnspython stub resolver that asks only the loopback server."""
    resolver = dns.resolver.Resolver(configure=False)
    host, port = server.address
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
    resolver.lifetime = 5
    return resolver
