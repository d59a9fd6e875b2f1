"""Where Postbode may send an HTTP request on a tenant's behalf, and what of the outcome the
tenant sees: public addresses only, unless the operator allows a private network or host
(checked at registration and again at connect time, after DNS resolution, so a name that later
resolves inward is refused); a short, sanitised response excerpt; one text per failure class."""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from postbode.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never a destination, whatever Python's idea of "global" is in the running version
# (RFC 6890 special-purpose registries; multicast, which `is_global` lets through).
_BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # RFC 6598 carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
_BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback, IPv4-compatible (deprecated, RFC 4291 §2.5.5.1)
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments (Teredo among them)
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local (ULA)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
_6TO4 = ipaddress.IPv6Network("2002::/16")  # RFC 3056: bits 16-48 are an IPv4 address
# Names that never lead to the public internet (RFC 6761 §6.3, RFC 6762, RFC 8375; `.internal`
# is reserved for private use by ICANN).
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")


class BlockedDestination(OSError):
    """A destination the policy refuses (raised by the resolver and the socket factory, so
    aiohttp reports it as a connection error)."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def is_public(ip: IPAddress) -> bool:
    """Whether `ip` is an ordinary public unicast address (an IPv6 address carrying an IPv4
    one is judged by that IPv4 address)."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public(inner)
    if isinstance(ip, ipaddress.IPv4Address):
        blocked: Iterable[IPNetwork] = _BLOCKED_V4
    else:
        blocked = _BLOCKED_V6
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in blocked)


def parse_address(host: str) -> IPAddress | None:
    """The IP address a URL host names, in any spelling a resolver would accept: dotted,
    bracketed IPv6 with or without a zone, and the legacy IPv4 forms of inet_aton(3)
    (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`); None for a host name."""
    text = host.strip().strip("[]").rstrip(".")
    text = text.split("%", 1)[0]  # an IPv6 zone (fe80::1%eth0) names an interface, not a host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(text) and any(c.isdigit() for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _parse_entry(entry: str) -> IPNetwork | str:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return entry.lower().rstrip(".")


@dataclass(frozen=True)
class DestinationPolicy:
    """Public addresses, plus the networks and host names the operator allows."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str) -> DestinationPolicy:
        """From `127.0.0.0/8, ::1, hooks.corp.example` (CIDRs, addresses, host names)."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            parsed = _parse_entry(entry)
            if isinstance(parsed, str):
                hosts.add(parsed)
            else:
                networks.append(parsed)
        return cls(tuple(networks), frozenset(hosts))

    @classmethod
    def from_settings(cls, settings: Settings) -> DestinationPolicy:
        """The policy of the `webhook_allow_private` setting."""
        return cls.parse(settings.webhook_allow_private)

    def allows_address(self, ip: IPAddress) -> bool:
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        inner = embedded_ipv4(ip)
        if inner is not None and any(inner in net for net in self.networks if net.version == 4):
            return True
        return is_public(ip)

    def allows_host_name(self, host: str) -> bool:
        """Whether a host name (not an address) is allowed by the operator by name."""
        return host.lower().rstrip(".") in self.hosts

    def refusal(self, host: str) -> str | None:
        """Why a URL host may not be registered (None: it may). Names are resolved only at
        connect time, where every address they resolve to is checked again."""
        name = host.lower().rstrip(".")
        if self.allows_host_name(name):
            return None
        ip = parse_address(name)
        if ip is not None:
            return None if self.allows_address(ip) else "the address is not a public one"
        if name == "localhost" or name.endswith(_PRIVATE_SUFFIXES):
            return "the host name is a local one"
        if "." not in name:  # a single label is completed by search domains: an inside name
            return "the host name is not a fully qualified domain name"
        return None

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Raise BlockedDestination unless every address `host` resolved to is allowed."""
        if self.allows_host_name(host):
            return
        for address in addresses:
            ip = parse_address(address)
            if ip is None or not self.allows_address(ip):
                raise BlockedDestination(BLOCKED_TEXT)


BLOCKED_TEXT = "destination not allowed: a private, loopback, link-local or reserved address"


def url_refusal(url: str, policy: DestinationPolicy) -> str | None:
    """Why the policy refuses the host of an http(s) URL, or None."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return "not a URL"
    return policy.refusal(host)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name when any address it resolves to is not allowed
    (so a name cannot mix a public address with an inner one)."""

    def __init__(self, policy: DestinationPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.DefaultResolver()
        self.vouched: set[str] = set()  # addresses of host names the operator allows

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        addresses = [r["host"] for r in found]
        self.policy.check_addresses(host, addresses)
        if self.policy.allows_host_name(host):
            self.vouched.update(addresses)
        return found

    async def close(self) -> None:
        await self.inner.close()

    def socket_factory(self, addr_info: Any) -> socket.socket:
        """The socket for one address aiohttp is about to connect to: the last check, which
        also covers URLs naming an address (aiohttp resolves no address literal)."""
        family, type_, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        ip = parse_address(address)
        if address not in self.vouched and (ip is None or not self.policy.allows_address(ip)):
            raise BlockedDestination(BLOCKED_TEXT)
        return socket.socket(family=family, type=type_, proto=proto)


def guarded_connector(
    policy: DestinationPolicy, inner: AbstractResolver | None = None, **kwargs: Any
) -> aiohttp.TCPConnector:
    """A TCPConnector that connects only where `policy` allows, checking each resolved
    address and each address it opens a socket to."""
    resolver = GuardedResolver(policy, inner)
    return aiohttp.TCPConnector(resolver=resolver, socket_factory=resolver.socket_factory, **kwargs)


# -- what the tenant sees of an attempt -----------------------------------------------------------

EXCERPT_CHARS = 200  # of a response body, kept and shown
CERTIFICATE_TEXT = "TLS error: the endpoint's certificate was not accepted"
CONNECTION_TEXT = "connection failed: no HTTP answer from the endpoint"
_SPACE = re.compile(r"\s+")


def excerpt(body: bytes) -> str:
    """The start of a response body as one line of printable text, at most EXCERPT_CHARS:
    control and formatting characters (bidi overrides among them) dropped, white space runs
    made one space, NUL never (PostgreSQL text holds none)."""
    text = _SPACE.sub(" ", body.decode("utf-8", "replace"))
    kept = "".join(c for c in text if unicodedata.category(c)[0] != "C")
    return kept.strip()[:EXCERPT_CHARS]


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "os_error", None)]


def describe_failure(exc: BaseException) -> str:
    """One text per failure class, never the library's detail: whether a port is closed,
    open to another protocol or filtered must not be readable from an attempt's error."""
    causes = list(_causes(exc))
    if any(isinstance(c, BlockedDestination) for c in causes):
        return BLOCKED_TEXT
    if any(isinstance(c, aiohttp.ClientConnectorCertificateError) for c in causes):
        return CERTIFICATE_TEXT
    return CONNECTION_TEXT


# -- an endpoint's URL, as a tenant registers it ------------------------------------------------

MAX_URL_LENGTH = 2000
STRICT = DestinationPolicy()  # public destinations only


class UrlRefused(ValueError):
    """A URL that cannot be an endpoint; `code` names why for the API."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def check_url(
    url: str,
    policy: DestinationPolicy = STRICT,
    *,
    credentials: bool = False,
    purpose: str = "webhooks go to public addresses",
) -> str:
    """An absolute http or https URL with a host the destination policy allows; with a user
    name and password only if `credentials` (a postmark-format endpoint's basic auth).
    Raises UrlRefused; `purpose` ends the message for a refused destination."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise UrlRefused(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("the URL must start with http:// or https://")
    if not parts.hostname or port == 0:
        raise UrlRefused("the URL has no host")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlRefused("the URL contains white space or control characters")
    if (parts.username is not None or parts.password is not None) and not credentials:
        raise UrlRefused(
            "the URL must not carry a user name or password (only a postmark-format endpoint "
            "takes basic-auth credentials in its URL, as Postmark's webhooks do)"
        )
    refusal = url_refusal(url, policy)
    if refusal is not None:
        raise UrlRefused(
            f"this destination is not allowed ({refusal}): {purpose}",
            code="destination_not_allowed",
        )
    return url


# -- the client -----------------------------------------------------------------------------------

CONNECTION_IDLE_SECONDS = 300.0  # a keep-alive connection is closed after this long unused


def open_session(
    timeout: float,
    pool_size: int,
    policy: DestinationPolicy | None = None,
    resolver: AbstractResolver | None = None,
    *,
    user_agent: str,
) -> aiohttp.ClientSession:
    """A worker's HTTP client: one keep-alive pool for every endpoint, `pool_size`
    connections at most, reused per origin (scheme, host, port); must be made on the loop.

    It connects only where `policy` allows (public addresses, plus the operator's
    allow-list), checking every address a name resolves to and every address it opens a
    socket to, so a name that resolves inward after registration is refused. Certificates
    are checked against the system's CAs (`ssl=True`); the endpoint's URL alone says where a
    request goes (no proxies from the environment); no cookie is kept, so one app's endpoint
    never sees another's. `resolver` (default: the system's) answers the names."""
    connector = guarded_connector(
        policy or DestinationPolicy(),
        resolver,
        limit=pool_size,
        ssl=True,
        keepalive_timeout=CONNECTION_IDLE_SECONDS,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"user-agent": user_agent},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
