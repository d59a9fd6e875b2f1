"""A loopback DNS server (dnslib, UDP and TCP on one port) serving the zones a test declares.

Example::

    with LoopbackDNS() as dns:                      # 127.0.0.1, a free port, UDP and TCP
        dns.add_mx("dest.test", [(10, "mx1.dest.test"), (20, "mx2.dest.test")])
        dns.add_a("mx1.dest.test", "127.0.0.2")
        dns.add_aaaa("mx2.dest.test", "::1")
        dns.add_txt("sel._domainkey.shop.test", "v=DKIM1; k=rsa; p=" + key_b64)  # split at 255
        dns.add_cname("www.dest.test", "dest.test")
        dns.add_null_mx("nomail.test")              # RFC 7505: MX 0 .
        dns.servfail("broken.test")                 # every type; servfail(name, "AAAA") for one
        dns.timeout("slow.test")                    # never answers (TCP: holds the connection)
        resolver = MxResolver(nameservers=dns.nameserver, ...)   # "127.0.0.1:PORT"
        ...
        assert dns.query_count("dest.test", "MX") == 1

Names under a zone the server is authoritative for (``test`` by default, plus the top-level
label of every name a test adds, plus ``add_zone()``) that were not declared answer NXDOMAIN;
a declared name without records of the asked type answers NOERROR with no answer (NODATA),
both with the zone's SOA in the authority section so negative answers carry a TTL
(RFC 2308 §3). Names outside every zone are REFUSED. CNAMEs are chased inside the server's
own data, as a recursive resolver would, so a stub resolver gets the whole chain.
Records and failures may be changed while the server runs.
"""

from __future__ import annotations

import errno
import logging
import socket
import socketserver
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Self

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

__all__ = ["Failure", "LoopbackDNS", "Query", "split_txt"]

_log = logging.getLogger(__name__)

# RFC 1035 §4.2.1: without EDNS a UDP answer is at most 512 bytes, else it is truncated (TC).
_UDP_LIMIT = 512
# Longest CNAME chain the server chases before giving up (loops are a test's mistake).
_MAX_CHAIN = 8


class Failure(StrEnum):
    """A scripted failure for a name (optionally for one record type)."""

    NXDOMAIN = "NXDOMAIN"
    SERVFAIL = "SERVFAIL"
    REFUSED = "REFUSED"
    TIMEOUT = "TIMEOUT"  # no answer at all


@dataclass(frozen=True)
class Query:
    """One question the server received."""

    name: str  # lower case, no trailing dot, as sent (IDNs arrive as punycode)
    rtype: str  # "MX", "A", …
    transport: Literal["udp", "tcp"]


@dataclass(frozen=True)
class _Record:
    rtype: str
    ttl: int
    rdata: Any  # a dnslib RD instance


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def split_txt(value: str | bytes) -> list[bytes]:
    """Split one TXT value into the ≤255-byte character-strings it travels as (RFC 1035 §3.3.14).

    Consumers concatenate them again without separators (RFC 6376 §3.6.2.2 for DKIM keys).
    """
    data = value.encode() if isinstance(value, str) else value
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


class _NoReply(Exception):
    """Raised by the resolver to make the handler send nothing (a scripted timeout)."""


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from the LoopbackDNS tables; called from socketserver threads."""

    def __init__(self, dns: LoopbackDNS) -> None:
        self._dns = dns

    def resolve(self, request: Any, handler: Any) -> Any:
        return self._dns._answer(request, handler.protocol)


class _Handler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler plus scripted silence and UDP truncation."""

    def handle(self) -> None:
        try:
            super().handle()
        except _NoReply:
            if self.protocol == "tcp":
                # Hold the connection open so the client times out rather than sees EOF.
                self.server.stopping.wait()

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        rdata: bytes = reply.pack()
        if self.protocol == "udp":
            # RFC 6891 §6.2.3: an OPT record advertises the client's UDP payload size.
            limit = max([_UDP_LIMIT] + [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT])
            if len(rdata) > limit:
                # RFC 7766 §5: set TC so the client retries over TCP. dnslib's truncate()
                # drops the question too, which stub resolvers reject as a mismatched reply.
                truncated = reply.truncate()
                truncated.add_question(*request.questions)
                rdata = truncated.pack()
        return rdata


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    # Non-daemon request threads are joined by server_close(), so stop() leaves nothing behind.
    daemon_threads = False
    block_on_close = True
    stopping: threading.Event

    def __init__(self, address: tuple[str, int], handler: type[DNSHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True  # a restarted test server may rebind despite TIME_WAIT
    stopping: threading.Event

    def __init__(self, address: tuple[str, int], handler: type[DNSHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class LoopbackDNS:
    """A real DNS server on loopback for tests: declare records, script failures, read queries."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        zones: Iterable[str] = ("test",),
        negative_ttl: int = 60,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._zones: set[str] = {_norm(z) for z in zones}
        self._records: dict[str, list[_Record]] = {}
        self._failures: dict[tuple[str, str | None], Failure] = {}
        self._queries: list[Query] = []
        self._stopping = threading.Event()
        self._servers: list[Any] = []  # dnslib DNSServer instances (UDP, TCP)
        self._port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind UDP and TCP on the same port (a stub resolver retries truncated answers there)."""
        if self._servers:
            raise RuntimeError("LoopbackDNS already started")
        self._stopping.clear()
        logger = DNSLogger(prefix=False, logf=_log.debug)
        attempts = 1 if self._requested_port else 50
        for _ in range(attempts):
            udp = DNSServer(
                _ZoneResolver(self),
                address=self._host,
                port=self._requested_port,
                logger=logger,
                handler=_Handler,
                server=_UDPServer,
            )
            port = int(udp.server.server_address[1])
            try:
                tcp = DNSServer(
                    _ZoneResolver(self),
                    address=self._host,
                    port=port,
                    tcp=True,
                    logger=logger,
                    handler=_Handler,
                    server=_TCPServer,
                )
            except OSError as exc:
                udp.server.server_close()
                if exc.errno != errno.EADDRINUSE or attempts == 1:
                    raise
                continue  # the UDP port's TCP twin is taken: try another port
            break
        else:  # pragma: no cover - 50 collisions in a row
            raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")
        for server in (udp, tcp):
            server.server.stopping = self._stopping
            # dnslib's start_thread() polls every 0.5 s, which stop() would wait out per server.
            server.thread = threading.Thread(
                target=server.server.serve_forever,
                kwargs={"poll_interval": 0.02},
                name=f"loopback-dns-{port}",
                daemon=True,
            )
            server.thread.start()
        self._servers = [udp, tcp]
        self._port = port
        return self

    def stop(self) -> None:
        """Stop both servers, release held TCP connections, join every thread, close sockets."""
        self._stopping.set()
        for server in self._servers:
            server.stop()  # socketserver.shutdown(): waits for serve_forever to return
            server.thread.join()
            server.server.server_close()  # joins request threads, closes the socket
        self._servers = []
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server answers on, UDP and TCP."""
        if self._port is None:
            raise RuntimeError("LoopbackDNS not started")
        return self._host, self._port

    @property
    def nameserver(self) -> str:
        """The address in the `host:port` form of the dns_nameservers setting."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- records --------------------------------------------------------------------------

    def add_zone(self, zone: str) -> None:
        """Make the server authoritative for `zone`: undeclared names under it get NXDOMAIN."""
        with self._lock:
            self._zones.add(_norm(zone))

    def add_mx(self, name: str, exchanges: Iterable[tuple[int, str]], ttl: int = 300) -> None:
        """Add MX records: (preference, exchange host) pairs."""
        for preference, exchange in exchanges:
            self._add(name, "MX", ttl, MX(_norm(exchange) or ".", preference))

    def add_null_mx(self, name: str, ttl: int = 300) -> None:
        """RFC 7505 §3: a single `MX 0 .` says the domain accepts no mail."""
        self._add(name, "MX", ttl, MX(".", 0))

    def add_a(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """Add A records."""
        for address in addresses:
            self._add(name, "A", ttl, A(address))

    def add_aaaa(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """Add AAAA records."""
        for address in addresses:
            self._add(name, "AAAA", ttl, AAAA(address))

    def add_txt(
        self, name: str, value: str | bytes | Sequence[str | bytes], ttl: int = 300
    ) -> None:
        """Add one TXT record: a long value is split into 255-byte strings, a sequence is kept."""
        if isinstance(value, str | bytes):
            strings = split_txt(value)
        else:
            strings = [s.encode() if isinstance(s, str) else s for s in value]
            if any(len(s) > 255 for s in strings):
                raise ValueError("TXT character-strings are at most 255 bytes (RFC 1035 §3.3)")
        self._add(name, "TXT", ttl, TXT(strings))

    def add_cname(self, name: str, target: str, ttl: int = 300) -> None:
        """Make `name` an alias of `target` (RFC 1034 §3.6.2: it then holds no other data)."""
        with self._lock:
            if any(r.rtype != "CNAME" for r in self._records.get(_norm(name), [])):
                raise ValueError(f"{name} has other records; a CNAME must stand alone")
        self._add(name, "CNAME", ttl, CNAME(_norm(target)))

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove a name's records (of one type, or all)."""
        key = _norm(name)
        with self._lock:
            kept = [r for r in self._records.get(key, []) if rtype and r.rtype != rtype.upper()]
            if kept:
                self._records[key] = kept
            else:
                self._records.pop(key, None)

    def _add(self, name: str, rtype: str, ttl: int, rdata: Any) -> None:
        key = _norm(name)
        with self._lock:
            existing = self._records.setdefault(key, [])
            if rtype != "CNAME" and any(r.rtype == "CNAME" for r in existing):
                raise ValueError(f"{name} is a CNAME; it cannot hold {rtype} records")
            existing.append(_Record(rtype, ttl, rdata))
            if self._zone_of(key) is None:
                self._zones.add(key.rsplit(".", 1)[-1])

    # -- failures -------------------------------------------------------------------------

    def nxdomain(self, name: str, rtype: str | None = None) -> None:
        """Answer NXDOMAIN for `name` (even if it has records)."""
        self._fail(name, rtype, Failure.NXDOMAIN)

    def servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL for `name` (all types, or only `rtype`)."""
        self._fail(name, rtype, Failure.SERVFAIL)

    def refuse(self, name: str, rtype: str | None = None) -> None:
        """Answer REFUSED for `name`."""
        self._fail(name, rtype, Failure.REFUSED)

    def timeout(self, name: str, rtype: str | None = None) -> None:
        """Never answer questions about `name`, so the client times out."""
        self._fail(name, rtype, Failure.TIMEOUT)

    def heal(self, name: str, rtype: str | None = None) -> None:
        """Remove the scripted failure for `name` (for `rtype`, or every failure of the name)."""
        key = _norm(name)
        with self._lock:
            for k in list(self._failures):
                if k[0] == key and (rtype is None or k[1] == rtype.upper()):
                    del self._failures[k]

    def _fail(self, name: str, rtype: str | None, failure: Failure) -> None:
        with self._lock:
            self._failures[(_norm(name), rtype.upper() if rtype else None)] = failure

    # -- what was asked -------------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        """Every question received so far, in order."""
        with self._lock:
            return list(self._queries)

    def query_count(self, name: str | None = None, rtype: str | None = None) -> int:
        """How many questions matched `name` and `rtype` (None matches any)."""
        key = _norm(name) if name is not None else None
        return sum(
            1
            for q in self.queries
            if (key is None or q.name == key) and (rtype is None or q.rtype == rtype.upper())
        )

    def clear_queries(self) -> None:
        """Forget the questions received so far."""
        with self._lock:
            self._queries.clear()

    # -- answering (socketserver threads) -------------------------------------------------

    def _zone_of(self, name: str) -> str | None:
        """The longest zone `name` is at or under (caller holds the lock)."""
        best: str | None = None
        for zone in self._zones:
            if (name == zone or name.endswith("." + zone)) and (
                best is None or len(zone) > len(best)
            ):
                best = zone
        return best

    def _exists(self, name: str) -> bool:
        """A name with records, or an empty non-terminal above one (RFC 8020 §2)."""
        if self._records.get(name):
            return True
        suffix = "." + name
        return any(k.endswith(suffix) for k, v in self._records.items() if v)

    def _failure_for(self, name: str, rtype: str) -> Failure | None:
        return self._failures.get((name, rtype)) or self._failures.get((name, None))

    def _soa(self, zone: str) -> Any:
        apex = zone or "."
        return RR(
            apex,
            QTYPE.SOA,
            ttl=self._negative_ttl,
            # RFC 2308 §4: the SOA MINIMUM field is the negative-caching TTL.
            rdata=SOA(
                f"ns.{zone}",
                f"hostmaster.{zone}",
                (1, 3600, 600, 86400, self._negative_ttl),
            ),
        )

    def _answer(self, request: Any, transport: Literal["udp", "tcp"]) -> Any:
        qname = _norm(str(request.q.qname))
        rtype = str(QTYPE[request.q.qtype])
        reply = request.reply()
        with self._lock:
            self._queries.append(Query(qname, rtype, transport))
            name = qname
            for hop in range(_MAX_CHAIN + 1):
                failure = self._failure_for(name, rtype)
                if failure is Failure.TIMEOUT:
                    raise _NoReply
                if failure is not None:
                    reply.header.rcode = getattr(RCODE, failure.value)
                    zone = self._zone_of(name)
                    if failure is Failure.NXDOMAIN and zone is not None:
                        reply.add_auth(self._soa(zone))
                    return reply
                records = self._records.get(name, [])
                aliases = [r for r in records if r.rtype == "CNAME"]
                if aliases and rtype not in ("CNAME", "ANY") and hop < _MAX_CHAIN:
                    # RFC 1034 §3.6.2: answer the alias and go on with its target.
                    alias = aliases[0]
                    reply.add_answer(RR(name, QTYPE.CNAME, ttl=alias.ttl, rdata=alias.rdata))
                    name = _norm(str(alias.rdata.label))
                    continue
                matching = [r for r in records if rtype == "ANY" or r.rtype == rtype]
                for r in matching:
                    reply.add_answer(RR(name, getattr(QTYPE, r.rtype), ttl=r.ttl, rdata=r.rdata))
                if matching:
                    return reply
                zone = self._zone_of(name)
                if zone is None:
                    if hop == 0:
                        reply.header.rcode = RCODE.REFUSED
                    return reply  # an alias leaving our data: the chain just stops
                if not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(zone))
                return reply
            return reply  # unreachable: the last hop never follows an alias
