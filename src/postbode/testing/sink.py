"""A real SMTP peer for tests (aiosmtpd on loopback) that records mail and answers as scripted.

Example::

    from postbode.testing.sink import DROP, STALL, Rule, Script, SmtpSink

    script = Script(
        Rule.rcpt("bounce@dest.test", "550 5.1.1 No such user"),
        Rule.rcpt("later@dest.test", "451 4.3.0 Busy", "451 4.3.0 Busy", "250 2.1.5 OK"),
        Rule.data(DROP, match="cut@dest.test"),    # close after the content, before the reply
        Rule.data(STALL, match="slow@dest.test"),  # never give the final reply
    )
    with SmtpSink(script=script, tls=True) as sink:     # 127.0.0.1, a free port, STARTTLS
        send_mail_to(sink.host, sink.port)               # code under test
        [msg] = sink.wait_for_sync(1, timeout=5)         # or: await sink.wait_for(1)
        assert msg.rcpt_tos == ("alice@dest.test",) and msg.tls
        assert sink.replies(Stage.RCPT, "later@dest.test") == ["451 4.3.0 Busy", …]
        sink.script.add(Rule.connect("421 4.3.2 Shutting down"))  # scripts change live

A rule matches a stage (connect, EHLO, MAIL, RCPT, DATA) and optionally an address: the EHLO
name, the sender at MAIL, the recipient at RCPT, any accepted recipient at DATA. Each time
it matches it gives its next reply; the last one repeats. A reply is an SMTP reply text
(several lines joined by newlines become a multi-line reply, RFC 5321 §4.2.1), or DROP (cut
the connection instead of answering) or STALL (never answer, until the client gives up or the
sink stops). Unmatched commands get the normal 2xx. The sink runs its own event loop in a
thread, like aiosmtpd's Controller, so it serves sync and async tests alike; `wait_for`
(async) and `wait_for_sync` let a test wait for mail instead of sleeping.
`SmtpSink(host="127.0.0.2", port=25)` (as root) or `SmtpSink.on_random_loopback()` stands in
for an MX host that real MX resolution finds.
"""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import enum
import errno
import ipaddress
import random
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, NoReturn, Self

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = [
    "DROP",
    "STALL",
    "Action",
    "Exchange",
    "Received",
    "Reply",
    "Rule",
    "Script",
    "SmtpSink",
    "Stage",
    "self_signed_certificate",
]


class Stage(enum.StrEnum):
    """The points in an SMTP session a rule can answer."""

    CONNECT = "connect"  # the greeting (RFC 5321 §4.3.1)
    EHLO = "ehlo"  # EHLO or HELO
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the reply after the message content (end of data)


class Action(enum.Enum):
    """Answers that are not replies."""

    DROP = "drop"  # close the connection instead of answering
    STALL = "stall"  # never answer (for client timeout tests)


DROP = Action.DROP
STALL = Action.STALL

Reply = str | Action


def normalise_reply(text: str) -> str:
    """Turn a reply text into wire form: one code on every line, `-` on all but the last.

    RFC 5321 §4.2.1: a multi-line reply repeats the code on every line, followed by `-`
    except on the last line, which has a space. Lines given without a code get the first
    line's code.
    """
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not (lines[0][:3].isdigit() and lines[0][3:4] in ("", " ", "-")):
        raise ValueError(f"not an SMTP reply: {text!r}")
    code = lines[0][:3]
    out = []
    for i, line in enumerate(lines):
        rest = line[4:] if line[:3].isdigit() and line[3:4] in ("", " ", "-") else line
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{rest}".rstrip())
    return "\r\n".join(out)


@dataclass
class Rule:
    """Replies for one stage (and optionally one address), given in turn; the last repeats."""

    stage: Stage
    replies: tuple[Reply, ...]
    match: str | None = None  # case-insensitive address (or EHLO name); None matches any
    uses: int = field(default=0, compare=False)  # how many times the rule answered

    def __post_init__(self) -> None:
        if not self.replies:
            raise ValueError("a rule needs at least one reply")
        self.stage = Stage(self.stage)
        self.replies = tuple(self.replies)
        # Validate now so a typo fails the test that wrote it, not the session.
        for reply in self.replies:
            if isinstance(reply, str):
                normalise_reply(reply)

    def matches(self, stage: Stage, subjects: Sequence[str]) -> bool:
        """Whether the rule applies to `stage` for any of `subjects`."""
        if stage != self.stage:
            return False
        if self.match is None:
            return True
        return any(s.lower() == self.match.lower() for s in subjects)

    def take(self) -> Reply:
        """The next reply (the last one repeats once the sequence is spent)."""
        reply = self.replies[min(self.uses, len(self.replies) - 1)]
        self.uses += 1
        return reply

    @classmethod
    def connect(cls, *replies: Reply) -> Rule:
        """Answer the connection: e.g. "554 5.7.1 Go away", "421 4.3.2 Busy", DROP, STALL."""
        return cls(Stage.CONNECT, replies)

    @classmethod
    def ehlo(cls, *replies: Reply, match: str | None = None) -> Rule:
        """Answer EHLO/HELO (a 2xx reply replaces the whole EHLO reply)."""
        return cls(Stage.EHLO, replies, match)

    @classmethod
    def mail(cls, *replies: Reply, match: str | None = None) -> Rule:
        """Answer MAIL FROM (for the sender `match`, or any)."""
        return cls(Stage.MAIL, replies, match)

    @classmethod
    def rcpt(cls, address: str | None, *replies: Reply) -> Rule:
        """Answer RCPT TO for `address` (None: every recipient)."""
        return cls(Stage.RCPT, replies, address)

    @classmethod
    def data(cls, *replies: Reply, match: str | None = None) -> Rule:
        """Answer the end of DATA (when `match` is among the accepted recipients, or always)."""
        return cls(Stage.DATA, replies, match)


class Script:
    """An ordered, thread-safe list of rules; the first matching rule answers."""

    def __init__(self, *rules: Rule) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = list(rules)

    def add(self, *rules: Rule) -> None:
        """Append rules (allowed while the sink runs)."""
        with self._lock:
            self._rules.extend(rules)

    def clear(self) -> None:
        """Remove every rule: the sink accepts everything again."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def answer(self, stage: Stage, subjects: Sequence[str]) -> Reply | None:
        """The scripted answer for this command, or None for the default behaviour."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(stage, subjects):
                    return rule.take()
        return None


@dataclass(frozen=True)
class Received:
    """One message the sink accepted at the end of DATA."""

    mail_from: str  # "<>" for the null reverse-path
    rcpt_tos: tuple[str, ...]  # the recipients accepted at RCPT
    data: bytes  # the content as received, dot-unstuffed, CRLF line ends
    peer: tuple[str, int]
    tls: bool  # STARTTLS was in effect (RFC 3207)
    tls_version: str | None  # e.g. "TLSv1.3"
    ehlo: str | None  # the EHLO/HELO name the client gave
    mail_options: tuple[str, ...]  # e.g. ("BODY=8BITMIME", "SMTPUTF8")
    reply: str  # the final reply the sink gave
    connection: int  # which connection (1-based) carried it

    @property
    def message(self) -> EmailMessage:
        """The content parsed with the modern email policy."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass(frozen=True)
class Exchange:
    """One scripted-point command and what the sink did: every connect, EHLO, MAIL, RCPT, DATA."""

    stage: Stage
    # The EHLO name, the address at MAIL/RCPT, the peer IP at connect, the accepted
    # recipients joined by "," at DATA.
    argument: str
    reply: str | None  # None when the sink dropped the connection or stalled
    action: Action | None  # DROP or STALL when the sink did not answer
    connection: int


@lru_cache(maxsize=16)
def self_signed_certificate(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A throw-away (certificate PEM, key PEM) for `names` (DNS names or IP addresses).

    Cached per process: key generation is the slow part and tests need no fresh keys.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A self-signed certificate that clients can also load as their trust anchor.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol plus a scriptable greeting and connection bookkeeping."""

    def __init__(self, sink: SmtpSink, number: int, **kwargs: Any) -> None:
        super().__init__(_Handler(sink, number), **kwargs)
        self._sink = sink
        self._number = number
        self._greeting: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the STARTTLS re-entry
            self._sink._live.add(self)
            with self._sink._lock:
                self._sink._opened.append((time.monotonic(), len(self._sink._live)))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._live.discard(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        # The first push is aiosmtpd's fixed "220 host ident" greeting: swap in a scripted one.
        greeting, self._greeting = self._greeting, None
        if greeting is None:
            await super().push(status)
        else:
            await super().push(greeting)

    async def _handle_client(self) -> None:
        peer_ip = str(self.session.peer[0]) if self.session and self.session.peer else ""
        answer = self._sink.script.answer(Stage.CONNECT, [peer_ip])
        if answer is None:
            greeting = f"220 {self.hostname} {self.__ident__}"  # what aiosmtpd sends
            self._sink._record(Exchange(Stage.CONNECT, peer_ip, greeting, None, self._number))
            await super()._handle_client()
            return
        if isinstance(answer, Action):
            self._sink._record(Exchange(Stage.CONNECT, peer_ip, None, answer, self._number))
            await _act(self, answer)
            return
        reply = normalise_reply(answer)
        self._sink._record(Exchange(Stage.CONNECT, peer_ip, reply, None, self._number))
        if reply.startswith("2"):
            self._greeting = reply
            await super()._handle_client()
        elif reply.startswith("421"):
            # RFC 5321 §3.8: 421 announces that the server closes the channel.
            await self.push(reply)
            if self.transport is not None:
                self.transport.close()
        else:
            await self._refuse_session(reply)

    async def _refuse_session(self, reply: str) -> None:
        # RFC 5321 §3.1: after a 554 greeting the server waits for QUIT and answers every other
        # command with 503.
        await self.push(reply)
        while self.transport is not None:
            line = await self._reader.readline()
            if not line:
                break
            if line.strip().upper() == b"QUIT":
                await self.push("221 2.0.0 Bye")
                self.transport.close()
                break
            await self.push("503 5.5.1 No service here, only QUIT")


async def _act(server: _SinkSMTP, action: Action) -> NoReturn:
    """Carry out DROP or STALL; either way this coroutine only ends by cancellation."""
    if action is Action.DROP:
        # Abort the socket itself (not the TLS layer) so the peer sees the cut at once,
        # without a TLS close_notify.
        transport = server._original_transport or server.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
    # connection_lost() cancels the session task: STALL ends when the client gives up
    # or the sink stops; DROP ends right away.
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the future above is never resolved")


class _Handler:
    """aiosmtpd hooks that ask the script, apply its answer and record what happened."""

    def __init__(self, sink: SmtpSink, number: int) -> None:
        self._sink = sink
        self._number = number

    async def _decide(
        self, server: _SinkSMTP, stage: Stage, argument: str, subjects: Sequence[str], default: str
    ) -> tuple[str, bool]:
        """(reply, whether the script chose it); DROP and STALL never return."""
        answer = self._sink.script.answer(stage, subjects)
        if isinstance(answer, Action):
            self._sink._record(Exchange(stage, argument, None, answer, self._number))
            await _act(server, answer)
        reply = default if answer is None else normalise_reply(answer)
        self._sink._record(Exchange(stage, argument, reply, None, self._number))
        return reply, answer is not None

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # An MX offers no AUTH; aiosmtpd would advertise it after STARTTLS.
        kept = [r[4:] for r in responses if not r[4:].upper().startswith("AUTH")]
        if self._sink._pipelining:  # aiosmtpd reads commands in order, however they come
            kept.insert(1, "PIPELINING")
        wire = [f"250-{line}" for line in kept[:-1]] + [f"250 {kept[-1]}"]
        reply, scripted = await self._decide(
            server, Stage.EHLO, hostname, [hostname], "\r\n".join(wire)
        )
        if not scripted:
            session.host_name = hostname
            return wire
        if reply.startswith("2"):
            session.host_name = hostname
        return [reply]

    async def handle_HELO(
        self, server: _SinkSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        reply, _ = await self._decide(
            server, Stage.EHLO, hostname, [hostname], f"250 {server.hostname}"
        )
        if reply.startswith("2"):
            session.host_name = hostname
        return reply

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply, _ = await self._decide(server, Stage.MAIL, address, [address], "250 2.1.0 OK")
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply, _ = await self._decide(server, Stage.RCPT, address, [address], "250 2.1.5 OK")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        sink = self._sink
        if sink.data_delay:
            await asyncio.sleep(sink.data_delay)
        queue_id = sink._next_queue_id()
        reply, _ = await self._decide(
            server,
            Stage.DATA,
            ",".join(envelope.rcpt_tos),
            list(envelope.rcpt_tos),
            f"250 2.0.0 OK queued as {queue_id}",
        )
        if reply.startswith("2"):
            ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
            peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
            sink._record(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    data=bytes(envelope.original_content or b""),
                    peer=(str(peer[0]), int(peer[1])),
                    tls=ssl_object is not None,
                    tls_version=ssl_object.version() if ssl_object is not None else None,
                    ehlo=session.host_name,
                    mail_options=tuple(envelope.mail_options),
                    reply=reply,
                    connection=self._number,
                )
            )
        return reply


class SmtpSink:
    """A scripted aiosmtpd server on loopback, running its own event loop in a thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        script: Script | None = None,
        tls: bool = False,
        require_tls: bool = False,
        hostname: str = "sink.test",
        tls_names: Iterable[str] = (),
        smtputf8: bool = True,
        data_size_limit: int | None = 32 * 1024 * 1024,
        session_timeout: float = 300.0,
        pipelining: bool = False,
        data_delay: float = 0.0,
    ) -> None:
        """`port=0` binds a free port (read it from `.port`); `tls` offers STARTTLS with a
        self-signed certificate naming `hostname`, `tls_names`, "localhost" and the bound
        address; `require_tls` refuses mail before STARTTLS (530, RFC 3207 §4); `pipelining`
        offers PIPELINING (RFC 2920); `data_delay` seconds pass before each reply to the end
        of DATA (a busy receiver: connections stay open longer)."""
        self._host = host
        self._requested_port = port
        self._random_host = False
        self.script = script if script is not None else Script()
        self.hostname = hostname
        self._tls = tls
        self._require_tls = require_tls
        self._tls_names = tuple(dict.fromkeys([hostname, *tls_names, "localhost"]))
        self._smtputf8 = smtputf8
        self._pipelining = pipelining
        self.data_delay = data_delay
        self._data_size_limit = data_size_limit
        self._session_timeout = session_timeout

        # Reentrant: wait_until_sync evaluates predicates (which read the records) under it.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._exchanges: list[Exchange] = []
        self._connections = 0
        self._queue_ids = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._live: set[_SinkSMTP] = set()  # touched only on the sink's loop
        self._opened: list[tuple[float, int]] = []  # (monotonic time, connections open then)
        self._tls_context: ssl.SSLContext | None = None
        self._port: int | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.tls_cert_pem: bytes | None = None
        self.tls_cert_file: Path | None = None

    @classmethod
    def on_random_loopback(cls, port: int = 25, **kwargs: Any) -> SmtpSink:
        """A sink on a free random 127.x.y.z address (port 25 by default, needs root).

        Parallel tests each get their own "MX host" address this way.
        """
        sink = cls("127.0.0.1", port, **kwargs)
        sink._random_host = True
        return sink

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a background thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("SmtpSink already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="smtp-sink", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            future = asyncio.run_coroutine_threadsafe(self._listen(), loop)
            self._server = future.result(timeout=10)
            # After binding, so the certificate also names the address actually bound.
            self._tls_context = self._make_tls_context() if self._tls else None
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def factory() -> _SinkSMTP:
            with self._lock:
                self._connections += 1
                number = self._connections
            return _SinkSMTP(
                self,
                number,
                hostname=self.hostname,
                ident="Postbode test sink",
                tls_context=self._tls_context,
                require_starttls=self._require_tls,
                enable_SMTPUTF8=self._smtputf8,
                data_size_limit=self._data_size_limit,
                timeout=self._session_timeout,
                loop=loop,
            )

        attempts = 50 if self._random_host else 1
        for attempt in range(attempts):
            if self._random_host:
                # 127.0.0.0/8 is all loopback on Linux; skip .0 and .255 host parts.
                self._host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."
                self._host += str(random.randint(1, 254))
            try:
                server = await loop.create_server(factory, self._host, self._requested_port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            break
        self._port = int(server.sockets[0].getsockname()[1])
        return server

    def _make_tls_context(self) -> ssl.SSLContext:
        names = (*self._tls_names, self._host)
        cert_pem, key_pem = self_signed_certificate(tuple(dict.fromkeys(names)))
        self._tmp = tempfile.TemporaryDirectory(prefix="postbode-sink-")
        cert_file = Path(self._tmp.name) / "cert.pem"
        key_file = Path(self._tmp.name) / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        self.tls_cert_pem, self.tls_cert_file = cert_pem, cert_file
        return context

    def stop(self) -> None:
        """Cut every connection (releasing stalls), close the listener, end the thread."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
        self._loop = self._thread = self._server = None
        self._port = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        with self._lock:
            self._wake_waiters()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in list(self._live):
            transport = protocol._original_transport or protocol.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        await asyncio.sleep(0)  # let connection_lost() run and cancel the sessions
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # stop() blocks briefly on the sink's own thread; never on the caller's loop tasks.
        self.stop()

    # -- where it listens -----------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SmtpSink not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- what happened --------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """Messages accepted so far, in order."""
        with self._lock:
            return list(self._messages)

    @property
    def exchanges(self) -> list[Exchange]:
        """Every connect/EHLO/MAIL/RCPT/DATA and what the sink did, in order."""
        with self._lock:
            return list(self._exchanges)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    def opened(self) -> list[tuple[float, int]]:
        """For each connection accepted, in order: when (`time.monotonic()`) and how many
        connections were open at that moment, itself included (the peak concurrency)."""
        with self._lock:
            return list(self._opened)

    def replies(self, stage: Stage, argument: str | None = None) -> list[str | None]:
        """The replies given at `stage` (for one argument, e.g. a recipient); None = no reply."""
        return [
            e.reply
            for e in self.exchanges
            if e.stage == stage and (argument is None or e.argument.lower() == argument.lower())
        ]

    def clear(self) -> None:
        """Forget the messages and exchanges recorded so far (the script keeps its state)."""
        with self._lock:
            self._messages.clear()
            self._exchanges.clear()

    def _record(self, item: Received | Exchange) -> None:
        with self._lock:
            if isinstance(item, Received):
                self._messages.append(item)
            else:
                self._exchanges.append(item)
            self._wake_waiters()

    def _next_queue_id(self) -> str:
        with self._lock:
            self._queue_ids += 1
            return f"SINK{self._queue_ids:06d}"

    def _wake_waiters(self) -> None:
        # Caller holds the lock; waiters deregister under it, so their loops are still open.
        self._changed.notify_all()
        for loop, future in self._waiters:
            loop.call_soon_threadsafe(_resolve, future)

    # -- waiting --------------------------------------------------------------------------

    async def wait_until(
        self,
        predicate: Callable[[SmtpSink], bool],
        timeout: float = 5.0,
        what: str = "condition",
    ) -> None:
        """Wait (on the caller's loop) until `predicate(sink)` holds, or raise TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(self._timeout_message(what, timeout))
            future: asyncio.Future[None] = loop.create_future()
            entry = (loop, future)
            with self._lock:
                self._waiters.append(entry)
            try:
                if predicate(self):  # changed between the check and registering
                    return
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    self._waiters.remove(entry)

    def wait_until_sync(
        self, predicate: Callable[[SmtpSink], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Block until `predicate(sink)` holds, or raise TimeoutError."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(self._timeout_message(what, timeout))

    async def wait_for(
        self,
        count: int = 1,
        timeout: float = 5.0,
    ) -> list[Received]:
        """Wait until at least `count` messages were accepted; returns all of them."""
        await self.wait_until(lambda s: len(s.messages) >= count, timeout, f"{count} message(s)")
        return self.messages

    def wait_for_sync(self, count: int = 1, timeout: float = 5.0) -> list[Received]:
        """Block until at least `count` messages were accepted; returns all of them."""
        self.wait_until_sync(lambda s: len(s.messages) >= count, timeout, f"{count} message(s)")
        return self.messages

    def _timeout_message(self, what: str, timeout: float) -> str:
        with self._lock:
            seen = ", ".join(
                f"{e.stage}:{e.argument}->{e.reply or e.action}" for e in self._exchanges[-12:]
            )
            count = len(self._messages)
        return f"SMTP sink: no {what} within {timeout}s ({count} accepted; last: {seen or 'none'})"


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
