"""SPF, DKIM and DMARC of inbound mail against records the loopback DNS server publishes."""

from __future__ import annotations

from collections.abc import Iterator

import dkim
import pytest

from postbode import tenancy
from postbode.inbound.verify import Sender, make_resolver, org_domain, verify
from postbode.testing.dns import LoopbackDNS

MESSAGE = (
    b"From: Alice <alice@news.sender.test>\r\n"
    b"To: support@in.shop.test\r\n"
    b"Subject: Hello\r\n"
    b"Message-ID: <1@news.sender.test>\r\n"
    b"\r\n"
    b"Hello there.\r\n"
)


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return tenancy.generate_dkim_key(1024)


@pytest.fixture
def dns(key: tuple[str, str]) -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        server.add_txt("s1._domainkey.sender.test", key[1])
        server.add_txt("sender.test", "v=spf1 ip4:127.0.0.1 -all")
        server.add_txt("news.sender.test", "v=spf1 include:sender.test -all")
        server.add_txt("_dmarc.sender.test", "v=DMARC1; p=quarantine; adkim=r; aspf=s")
        yield server


def signed(key: str, domain: bytes = b"sender.test") -> bytes:
    return dkim.sign(MESSAGE, b"s1", domain, key.encode(), include_headers=[b"from"]) + MESSAGE


def check(dns: LoopbackDNS, raw: bytes, ip: str, mail_from: str) -> dict:  # type: ignore[type-arg]
    resolver = make_resolver(dns.nameserver)
    return verify(raw, Sender(ip, "mta.sender.test", mail_from), resolver, "mx.postbode.test")


def test_spf_and_dkim_pass_and_dmarc_passes_through_the_organizational_domain(
    dns: LoopbackDNS, key: tuple[str, str]
) -> None:
    result = check(dns, signed(key[0]), "127.0.0.1", "bounces@news.sender.test")
    assert result["spf"] == {
        "result": "pass",
        "domain": "news.sender.test",
        "detail": "sender SPF authorized",
    }
    assert result["dkim"] == [
        {"result": "pass", "domain": "sender.test", "selector": "s1", "detail": ""}
    ]
    # No record at _dmarc.news.sender.test: the organizational domain's applies, and DKIM's
    # d=sender.test is aligned with From news.sender.test under adkim=r.
    assert result["dmarc"]["result"] == "pass"
    assert result["dmarc"]["policy"] == "quarantine"
    assert result["dmarc"]["detail"] == "record at _dmarc.sender.test"
    assert result["header"] == (
        "mx.postbode.test; spf=pass smtp.mailfrom=news.sender.test; "
        "dkim=pass header.d=sender.test header.s=s1; dmarc=pass header.from=news.sender.test"
    )


def test_one_changed_body_byte_fails_dkim_and_then_dmarc(
    dns: LoopbackDNS, key: tuple[str, str]
) -> None:
    altered = signed(key[0]).replace(b"Hello there.", b"Hello there!")
    result = check(dns, altered, "127.0.0.9", "bounces@news.sender.test")
    assert result["spf"]["result"] == "fail"
    assert [d["result"] for d in result["dkim"]] == ["fail"]
    assert result["dmarc"]["result"] == "fail"
    assert result["dmarc"]["disposition"] == "quarantine"


def test_unsigned_mail_from_a_domain_without_records(dns: LoopbackDNS) -> None:
    raw = MESSAGE.replace(b"news.sender.test", b"plain.test")
    result = check(dns, raw, "127.0.0.1", "someone@plain.test")
    assert result["spf"]["result"] == "none"
    assert result["dkim"] == []
    assert result["dmarc"]["result"] == "none"
    assert "dkim=none" in result["header"]


def test_a_key_missing_from_dns_and_a_dns_failure(dns: LoopbackDNS, key: tuple[str, str]) -> None:
    dns.remove("s1._domainkey.sender.test")
    result = check(dns, signed(key[0]), "127.0.0.1", "bounces@news.sender.test")
    assert result["dkim"][0]["result"] in ("permerror", "fail")
    dns.servfail("_dmarc.news.sender.test")
    result = check(dns, signed(key[0]), "127.0.0.1", "bounces@news.sender.test")
    assert result["dmarc"]["result"] == "temperror"


def test_no_client_address_and_a_null_sender(dns: LoopbackDNS) -> None:
    assert check(dns, MESSAGE, "unknown", "x@sender.test")["spf"]["result"] == "none"
    # RFC 7208 §2.4: a null reverse path is checked as postmaster@<HELO name>
    result = check(dns, MESSAGE, "127.0.0.1", "")
    assert result["spf"]["domain"] == "mta.sender.test"


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("in.shop.test", "shop.test"),
        ("shop.test", "shop.test"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("mail.example.com", "example.com"),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert org_domain(domain) == org
