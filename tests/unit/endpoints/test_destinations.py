"""The destination policy's pure parts: address spellings, what is public, the allow-list,
excerpts of answers."""

from __future__ import annotations

import ipaddress

import pytest

from postbode.endpoints.destinations import (
    EXCERPT_CHARS,
    BlockedDestination,
    DestinationPolicy,
    excerpt,
    is_public,
    parse_address,
)

STRICT = DestinationPolicy()


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("[::1]", "::1"),
        ("[fe80::1%eth0]", "fe80::1"),
        ("127.0.0.1.", "127.0.0.1"),
    ],
)
def test_every_spelling_of_an_address_is_read_as_the_address(host: str, address: str) -> None:
    assert parse_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["hooks.example", "abc.def", "deadbeef.example", "cafe"])
def test_host_names_are_not_addresses(host: str) -> None:
    assert parse_address(host) is None


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "0.0.0.0",
        "0",
        "10.0.0.1",
        "172.16.5.4",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "198.18.0.1",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::ffff:169.254.169.254]",
        "[::127.0.0.1]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:a9fe:a9fe::1]",
        "[fd00::1]",
        "[fc12:3456::1]",
        "[fe80::1]",
        "[fe80::1%eth0]",
        "[ff02::1]",
        "localhost",
        "LOCALHOST.",
        "api.localhost",
        "printer.local",
        "metadata.google.internal",
        "router.home.arpa",
        "intranet",
    ],
)
def test_inner_destinations_are_refused_at_registration(host: str) -> None:
    assert STRICT.refusal(host) is not None


@pytest.mark.parametrize(
    "host", ["hooks.example.com", "93.184.216.34", "[2606:4700:4700::1111]", "8.8.8.8"]
)
def test_public_destinations_are_allowed(host: str) -> None:
    assert STRICT.refusal(host) is None


def test_public_means_ordinary_unicast() -> None:
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    assert is_public(ipaddress.ip_address("::ffff:93.184.216.34"))  # judged by its IPv4 address
    assert not is_public(ipaddress.ip_address("224.0.0.251"))  # multicast, "global" to Python
    assert not is_public(ipaddress.ip_address("64:ff9b::7f00:1"))  # NAT64 of 127.0.0.1


def test_the_operator_allows_networks_and_host_names() -> None:
    policy = DestinationPolicy.parse(" 10.1.2.0/24, fd00::/8 ,hooks.corp.example.,, 127.0.0.1")
    for host in ("10.1.2.3", "[fd00::5]", "hooks.corp.example", "127.0.0.1", "[::ffff:10.1.2.9]"):
        assert policy.refusal(host) is None, host
    for host in ("10.1.3.1", "127.0.0.2", "other.corp.internal", "[::1]"):
        assert policy.refusal(host) is not None, host


def test_resolved_addresses_are_all_checked() -> None:
    STRICT.check_addresses("hooks.example", ["93.184.216.34", "2606:4700::1"])
    with pytest.raises(BlockedDestination):
        STRICT.check_addresses("hooks.example", ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(BlockedDestination):
        STRICT.check_addresses("hooks.example", ["::ffff:10.0.0.1"])
    allowing = DestinationPolicy.parse("hooks.corp.example")
    allowing.check_addresses("hooks.corp.example", ["10.0.0.1"])


def test_an_excerpt_is_one_short_line_of_printable_text() -> None:
    assert excerpt(b"  ok \r\n\tthanks ") == "ok thanks"
    assert excerpt("a\u202eb\u200bc\x00d\x1b[0m".encode()) == "abcd[0m"
    assert excerpt(b"\xff\xfe") == "\ufffd\ufffd"
    assert len(excerpt(b"x" * 10_000)) == EXCERPT_CHARS
