"""Where mail for a domain goes: transport map, then MX (RFC 5321 §5.1) resolved with dnspython."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Self

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

if TYPE_CHECKING:
    from postbode.config import Settings

__all__ = [
    "DnsFailure",
    "DnsHardFail",
    "DnsSoftFail",
    "MxLookup",
    "MxResolver",
    "Target",
    "TransportRoute",
    "order_mx",
    "parse_nameservers",
    "parse_transport_map",
    "route_for",
    "to_ascii_domain",
]

SMTP_PORT = 25  # RFC 5321 §4.5.4.2: MX delivery always uses port 25
# Postfix's smtp_mx_address_limit idea: a hostile domain listing hundreds of MX hosts
# must not make every attempt a DNS storm. Hosts past this count are not looked up.
MAX_MX_HOSTS = 10


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try: the host it belongs to, its IP, port and MX preference."""

    host: str  # the MX host name (ASCII), the domain for an implicit MX, or the route's host
    ip: str
    port: int = SMTP_PORT
    preference: int = 0
    source: Literal["mx", "implicit", "transport", "literal"] = "mx"

    def __str__(self) -> str:
        # Postfix's log form: host[ip]:port
        return f"{self.host}[{self.ip}]:{self.port}"


class DnsFailure(Exception):
    """Mail cannot be routed now; `status` is the RFC 3463 enhanced status for the DSN."""

    permanent: bool = False

    def __init__(self, reason: str, status: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class DnsHardFail(DnsFailure):
    """Permanent: the domain does not exist, accepts no mail, or has no usable host."""

    permanent = True


class DnsSoftFail(DnsFailure):
    """Temporary: SERVFAIL, timeout or another DNS error; try again later."""


class MxLookup(Protocol):
    """Anything that turns a recipient domain into ordered delivery targets."""

    async def resolve(self, domain: str) -> list[Target]:
        """Targets in the order to try them; raises DnsHardFail or DnsSoftFail."""
        ...


# -- pure parts ----------------------------------------------------------------------------


def to_ascii_domain(domain: str) -> str:
    """The lower-case A-label form of `domain` (IDNA 2008 with UTS #46 mapping), no final dot.

    RFC 5890: DNS holds internationalised names as punycode A-labels; RFC 6531 §3.3 keeps
    U-labels in the SMTP envelope, so the conversion happens here, right before lookup.
    Raises ValueError for a name DNS cannot hold.
    """
    text = domain.strip().rstrip(".")
    if not text:
        raise ValueError("empty domain")
    try:
        name = dns.name.from_text(text, idna_codec=dns.name.IDNA_2008_Practical)
    except dns.exception.DNSException as exc:
        raise ValueError(f"invalid domain {domain!r}: {exc}") from exc
    return name.to_text(omit_final_dot=True).lower()


def _address_literal(domain: str) -> str | None:
    """The IP of an RFC 5321 §4.1.3 address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address (no port)
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad address {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """`"127.0.0.1:5353,127.0.0.2,[::1]:53"` → [(ip, port), …]; port 53 when omitted.

    Nameservers must be IP addresses: a resolver cannot look up its own servers.
    """
    servers: list[tuple[str, int]] = []
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        host, port = _split_host_port(item, 53)
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"nameserver {item.strip()!r} is not an IP address") from None
        servers.append((ip, port))
    return servers


@dataclass(frozen=True, slots=True)
class TransportRoute:
    """A transport map entry: mail for `pattern` goes to host:port, bypassing MX."""

    pattern: str  # "example.test", "*.corp.test" (subdomains only) or "*" (everything)
    host: str  # an IP address or a host name (looked up by A/AAAA, never MX)
    port: int


def parse_transport_map(text: str) -> tuple[TransportRoute, ...]:
    """Parse `example.test=127.0.0.1:2600,*.corp.test=[::1]:2601` (commas or newlines).

    Like Postfix's transport map: an exact domain, `*.domain` for its subdomains, or `*` for
    every domain; the port defaults to 25. Raises ValueError naming the bad entry.
    """
    routes: list[TransportRoute] = []
    seen: set[str] = set()
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        pattern, sep, nexthop = item.partition("=")
        pattern = pattern.strip()
        if not sep or not pattern or not nexthop.strip():
            raise ValueError(f"transport map entry {item.strip()!r} is not domain=host:port")
        if pattern != "*":
            wildcard = pattern.startswith("*.")
            domain = to_ascii_domain(pattern[2:] if wildcard else pattern)
            pattern = f"*.{domain}" if wildcard else domain
        if pattern in seen:
            raise ValueError(f"transport map lists {pattern!r} twice")
        seen.add(pattern)
        host, port = _split_host_port(nexthop, SMTP_PORT)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = to_ascii_domain(host)
        routes.append(TransportRoute(pattern, host, port))
    return tuple(routes)


def route_for(routes: Sequence[TransportRoute], domain: str) -> TransportRoute | None:
    """The route for an A-label `domain`: exact match, else the longest `*.` suffix, else `*`."""
    best: TransportRoute | None = None
    for route in routes:
        if route.pattern == domain:
            return route
        if route.pattern == "*":
            matched = True
        else:
            matched = route.pattern.startswith("*.") and domain.endswith(route.pattern[1:])
        if matched and (best is None or len(route.pattern) > len(best.pattern)):
            best = route
    return best


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """MX records by preference, lowest first; equal preferences in random order.

    RFC 5321 §5.1: "If there are multiple destinations with the same preference and there is
    no clear reason to favor one ..., then the sender-SMTP MUST randomize them to spread the
    load across multiple mail exchangers". A host listed twice is kept once, at its best.
    """
    shuffled = list(records)
    rng.shuffle(shuffled)
    ordered = sorted(shuffled, key=lambda r: r[0])  # sorted() is stable: ties stay shuffled
    seen: set[str] = set()
    unique = []
    for preference, host in ordered:
        if host not in seen:
            seen.add(host)
            unique.append((preference, host))
    return unique


# -- the resolver --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """One DNS question's outcome, as cached: records, NODATA, or NXDOMAIN."""

    status: Literal["ok", "nodata", "nxdomain"]
    mx: tuple[tuple[int, str], ...] = ()  # (preference, exchange); "." is the root (null MX)
    addresses: tuple[str, ...] = ()


class MxResolver:
    """Resolve recipient domains to ordered delivery targets, with a TTL-respecting cache.

    Example::

        resolver = MxResolver("127.0.0.1:5353", "example.test=127.0.0.1:2600", timeout=5)
        try:
            targets = await resolver.resolve("dest.test")
        except DnsHardFail as fail:    # bounce: fail.status "5.1.2", fail.reason …
            ...
        except DnsSoftFail as fail:    # retry later: fail.status "4.4.3"
            ...
    """

    def __init__(
        self,
        nameservers: str = "",
        transport_map: str = "",
        timeout: float = 10.0,
        *,
        prefer_ipv6: bool = False,
        max_ttl: int = 86400,
        max_cache_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`nameservers`: "ip[:port],…" (empty: the system's resolv.conf); `timeout`: seconds
        per DNS question; `clock` and `rng` are there for tests."""
        self._routes = parse_transport_map(transport_map)
        servers = parse_nameservers(nameservers)
        # configure=False: with nameservers given, never read the system configuration.
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = None  # our own cache, on an injectable clock
        self._timeout = timeout
        self._prefer_ipv6 = prefer_ipv6
        self._max_ttl = max_ttl
        self._max_cache_entries = max_cache_entries
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[_Answer]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, timeout: float = 10.0) -> Self:
        """A resolver configured by `dns_nameservers` and `transport_map`."""
        return cls(settings.dns_nameservers, settings.transport_map, timeout)

    @property
    def routes(self) -> tuple[TransportRoute, ...]:
        return self._routes

    def clear_cache(self) -> None:
        self._cache.clear()

    async def resolve(self, domain: str) -> list[Target]:
        """The targets for `domain`, in the order to try them.

        Raises DnsHardFail (NXDOMAIN, null MX, no usable host, invalid name) or DnsSoftFail
        (SERVFAIL, timeout, other DNS errors).
        """
        try:
            literal = _address_literal(domain.strip())
        except ValueError:
            raise DnsHardFail(f"invalid address literal {domain!r}", "5.1.2") from None
        if literal is not None:
            return [Target(domain.strip(), literal, SMTP_PORT, 0, "literal")]
        try:
            name = to_ascii_domain(domain)
        except ValueError as exc:
            raise DnsHardFail(str(exc), "5.1.2") from None

        route = route_for(self._routes, name)
        if route is not None:
            return await self._route_targets(route)

        answer = await self._lookup(name, "MX")
        if answer.status == "nxdomain":
            # RFC 3463 §3.2: X.1.2 bad destination system address.
            raise DnsHardFail(f"{name}: domain does not exist (NXDOMAIN)", "5.1.2")
        if answer.mx:
            # RFC 7505 §3: "MX 0 ." says the domain accepts no mail; such a record is
            # never a host to try, even if (wrongly) listed beside real ones.
            usable = [(pref, host) for pref, host in answer.mx if host != "."]
            if not usable:
                raise DnsHardFail(f"{name} accepts no mail (null MX, RFC 7505)", "5.1.10")
            hosts = order_mx(usable, self._rng)[:MAX_MX_HOSTS]
            source: Literal["mx", "implicit"] = "mx"
        else:
            # RFC 5321 §5.1: no MX records: the domain itself is the implicit MX, preference 0.
            hosts = [(0, name)]
            source = "implicit"

        results = await asyncio.gather(
            *(self._addresses(host) for _, host in hosts), return_exceptions=True
        )
        targets: list[Target] = []
        soft: list[str] = []
        hard: list[str] = []
        seen: set[str] = set()
        for (preference, host), result in zip(hosts, results, strict=True):
            if isinstance(result, DnsSoftFail):
                soft.append(result.reason)
            elif isinstance(result, DnsHardFail):
                hard.append(result.reason)
            elif isinstance(result, BaseException):
                raise result
            else:
                for ip in result:
                    if ip not in seen:  # one address is worth one try per attempt
                        seen.add(ip)
                        targets.append(Target(host, ip, SMTP_PORT, preference, source))
        if targets:
            return targets
        if soft:
            raise DnsSoftFail("; ".join(soft + hard), "4.4.3")
        # RFC 5321 §5.1: MX records that are all unusable, or an unusable implicit MX,
        # "MUST be reported as an error". RFC 3463: X.4.4 unable to route.
        what = "no usable MX host" if source == "mx" else "no MX and no address records"
        raise DnsHardFail(f"{name}: {what} ({'; '.join(hard)})", "5.4.4")

    async def _route_targets(self, route: TransportRoute) -> list[Target]:
        try:
            ips = [str(ipaddress.ip_address(route.host))]
        except ValueError:
            ips = await self._addresses(route.host)  # a named next hop: A/AAAA, never MX
        return [Target(route.host, ip, route.port, 0, "transport") for ip in ips]

    async def _addresses(self, host: str) -> list[str]:
        """A and AAAA of one host (an IP literal stands for itself); raises DnsFailure."""
        try:
            # RFC 5321 §5.1 wants a name here, but MX records holding an IP exist: use it.
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        # A resolver follows an MX host that is a CNAME (RFC 2181 §10.3 forbids the setup,
        # RFC 5321 §5.1 asks clients to cope): the answer carries the whole chain.
        v4, v6 = await asyncio.gather(
            self._lookup(host, "A"), self._lookup(host, "AAAA"), return_exceptions=True
        )
        found: list[str] = []
        # IPv4 first by default: receivers are stricter about IPv6 senders (reverse DNS,
        # reputation), and IPv4 stays the path most mail takes.
        for result in (v6, v4) if self._prefer_ipv6 else (v4, v6):
            if isinstance(result, _Answer):
                found.extend(result.addresses)
        if found:
            return found  # one family failing softly does not matter when the other answers
        for result in (v4, v6):
            if isinstance(result, BaseException):
                raise result  # DnsSoftFail: a missing answer may yet come
        if any(isinstance(r, _Answer) and r.status == "nxdomain" for r in (v4, v6)):
            raise DnsHardFail(f"{host}: host does not exist (NXDOMAIN)", "5.4.4")
        raise DnsHardFail(f"{host}: no A or AAAA records", "5.4.4")

    # -- one question, cached and shared ----------------------------------------------------

    async def _lookup(self, name: str, rdtype: str) -> _Answer:
        key = (name, rdtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not loop:
            # Concurrent deliveries to one domain share one question instead of each asking.
            task = loop.create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(self._forget_inflight(key))
        # shield: one caller's cancellation must not cancel the question for the others.
        return await asyncio.shield(task)

    def _forget_inflight(self, key: tuple[str, str]) -> Callable[[asyncio.Task[_Answer]], None]:
        def done(task: asyncio.Task[_Answer]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved, even if every awaiting caller was cancelled

        return done

    async def _query(self, name: str, rdtype: str) -> _Answer:
        qname = dns.name.from_text(name)
        try:
            result = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            answer = _Answer("nxdomain")
            self._store(name, rdtype, answer, _negative_ttl(exc, qname))
            return answer
        except dns.exception.Timeout:
            raise DnsSoftFail(
                f"{rdtype} lookup for {name} timed out after {self._timeout:g}s", "4.4.3"
            ) from None
        except dns.resolver.NoNameservers as exc:
            # Every nameserver answered SERVFAIL/REFUSED or could not be reached.
            raise DnsSoftFail(f"{rdtype} lookup for {name} failed: {exc}", "4.4.3") from None
        except dns.exception.DNSException as exc:
            raise DnsSoftFail(f"{rdtype} lookup for {name} failed: {exc}", "4.4.3") from None
        answer = _parse(result.rrset, rdtype)
        self._store(name, rdtype, answer, result.chaining_result.minimum_ttl)
        return answer

    def _store(self, name: str, rdtype: str, answer: _Answer, ttl: int) -> None:
        ttl = min(ttl, self._max_ttl)
        if ttl <= 0:
            return  # RFC 1035 §3.2.1: TTL 0 means use once, do not cache
        now = self._clock()
        if len(self._cache) >= self._max_cache_entries:
            for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[key]
            while len(self._cache) >= self._max_cache_entries:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[(name, rdtype)] = (now + ttl, answer)


def _parse(rrset: dns.rrset.RRset | None, rdtype: str) -> _Answer:
    if rrset is None:
        return _Answer("nodata")
    if rdtype == "MX":
        records = []
        for rdata in rrset:
            exchange = rdata.exchange
            host = "." if exchange == dns.name.root else exchange.to_text(omit_final_dot=True)
            records.append((int(rdata.preference), host.lower()))
        return _Answer("ok", mx=tuple(records))
    if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return _Answer("ok", addresses=tuple(rdata.to_text() for rdata in rrset))
    return _Answer("nodata")  # pragma: no cover - only MX, A and AAAA are asked


def _negative_ttl(exc: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> int:
    """RFC 2308 §5: cache NXDOMAIN for min(SOA TTL, SOA MINIMUM); 0 without an SOA."""
    response = exc.responses().get(qname)  # type: ignore[no-untyped-call]
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(int(rrset.ttl), int(rrset[0].minimum))
    return 0
