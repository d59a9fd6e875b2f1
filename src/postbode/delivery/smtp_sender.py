"""The SMTP client side of delivery: one session to one remote host, outcomes per recipient."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast

import idna
from aiosmtplib.errors import (
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

from postbode.delivery.backoff import retry_hint
from postbode.delivery.outcomes import Delivered, HardFail, Outcome, Reply, SoftFail

if TYPE_CHECKING:
    from postbode.config import Settings

__all__ = [
    "Attempt",
    "SendResult",
    "SmtpSession",
    "SmtpTimeouts",
    "TlsMode",
    "TranscriptLine",
    "parse_tls_policy",
    "send_message",
    "tls_mode_for",
]

TlsMode = Literal["none", "opportunistic", "require", "verify"]
"""STARTTLS policy (RFC 3207) for one destination:

- ``none``: never STARTTLS.
- ``opportunistic``: STARTTLS when offered, without certificate checks (RFC 7435). If
  the TLS handshake fails, reconnect and deliver in plain text on a fresh connection
  (as Postfix's ``may`` level does): a broken TLS stack on the remote must not stop
  mail that would otherwise go out in plain text anyway. A 4xx/5xx reply to STARTTLS
  continues in plain text on the same connection (RFC 3207 §4).
- ``require``: STARTTLS must be offered and succeed (certificate not checked), else
  SoftFail ("STARTTLS required but not offered").
- ``verify``: as ``require``, and the certificate must chain to a trusted CA and name
  the MX host.
"""

TLS_MODES: tuple[TlsMode, ...] = ("none", "opportunistic", "require", "verify")


@dataclass(frozen=True, slots=True)
class SmtpTimeouts:
    """Client timeouts in seconds (RFC 5321 §4.5.3.2 gives the traditional minimums)."""

    connect: float = 30.0
    """TCP connect."""
    command: float = 60.0
    """Each reply: greeting, EHLO, STARTTLS (and its handshake), MAIL, RCPT, DATA, RSET
    (§4.5.3.2.1-4 suggest 2-5 minutes)."""
    data_termination: float = 300.0
    """Sending the message and the reply to the final "." (§4.5.3.2.6 suggests 10 min)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The timeouts configured in settings (smtp_*_timeout)."""
        return cls(
            connect=settings.smtp_connect_timeout,
            command=settings.smtp_command_timeout,
            data_termination=settings.smtp_data_timeout,
        )


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """One line of the SMTP conversation: C (we sent), S (server sent) or * (a note)."""

    at: float
    """Seconds since the connection attempt started."""
    direction: Literal["C", "S", "*"]
    text: str

    def __str__(self) -> str:
        return f"{self.at:8.3f} {self.direction}: {self.text}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What happened on the wire for one message: the row for the `attempts` table."""

    mx_host: str
    ip: str
    port: int
    started_at: datetime
    """Wall-clock start (UTC) of this attempt: the connect for the first message of a
    session, the start of the transaction for later ones."""
    duration: float
    """Seconds from started_at to the end of this message's transaction."""
    tls_version: str | None
    tls_cipher: str | None
    final_reply: Reply | None
    """The last reply that decided the outcome (None when no reply came)."""
    transcript: tuple[TranscriptLine, ...]
    """Connection set-up (connect, greeting, EHLO, STARTTLS) then this message's
    commands and replies; the message itself appears as "<message body, N bytes>"."""

    def transcript_text(self) -> str:
        """The transcript as text, one line each."""
        return "\n".join(str(line) for line in self.transcript)


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome for every recipient of one message, and the attempt that produced it."""

    outcomes: Mapping[str, Outcome]
    """Keyed by the recipient address exactly as given to send(), in that order."""
    attempt: Attempt
    session_error: str | None = None
    """Set when the session itself failed (connect, greeting, EHLO, TLS, timeout, drop)
    rather than the remote answering this message: the caller may try another MX."""
    message_sent: bool = False
    """The content went out after 354. If the final reply then never came, the remote
    may still deliver it (RFC 1047): trying another MX risks a duplicate."""


class _Broken(Exception):
    """The session cannot go on; carries the outcome for every undecided recipient."""

    def __init__(self, outcome: SoftFail | HardFail) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class _BadAddress(ValueError):
    """An envelope address we must not send (and never will be able to)."""


@dataclass(slots=True)
class _Envelope:
    """An address as it goes on the wire."""

    wire: bytes
    needs_smtputf8: bool


# Characters that never belong in an envelope address on the wire: controls would
# inject commands (RFC 5321 §4.1.2 forbids them), angle brackets would end the path.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f<>]")

# RFC 5321 §4.5.3.1.6 caps a reply line at 512 octets; aiosmtplib refuses lines over
# 8 KiB and whole replies over 32 KiB, and the per-reply timeout bounds the time.

_QUIT_TIMEOUT = 5.0
_CLOSE_GRACE = 2.0


def _soft(reply: Reply | None, reason: str) -> SoftFail:
    return SoftFail(reply, retry_hint(reply.text) if reply else None, reason)


# The SMTP stage each refused command stands for, as bounce classification names it
# (bounces.classify.STAGES): the greeting, MAIL, RCPT, and DATA with the end of data.
_STAGE_OF = {
    "greeting": "connect",
    "MAIL FROM": "mail",
    "RCPT TO": "rcpt",
    "DATA": "data",
    "message": "data",
}


def _negative(reply: Reply, what: str) -> SoftFail | HardFail:
    """The outcome of a 4xx/5xx reply to a command; any other unexpected reply leaves
    the conversation out of step, so it ends the session."""
    stage = _STAGE_OF.get(what)
    if reply.is_permanent:
        return HardFail(reply, f"{what} rejected", stage)
    if reply.is_transient:
        return SoftFail(reply, retry_hint(reply.text), f"{what} deferred", stage)
    raise _Broken(_soft(reply, f"unexpected reply to {what}"))


def _a_label(domain: str) -> str:
    """The domain in ASCII: IDNA A-labels for internationalised names (RFC 5890)."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise _BadAddress(f"invalid domain {domain!r}: {exc}") from exc


def _envelope(address: str) -> _Envelope:
    """Encode an envelope address: IDNA domain, UTF-8 local part (needs SMTPUTF8)."""
    if address == "":
        return _Envelope(b"", False)  # RFC 5321 §4.5.5: the null reverse-path <>
    if _FORBIDDEN.search(address):
        raise _BadAddress(f"invalid characters in address {address!r}")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise _BadAddress(f"not an address: {address!r}")
    if domain.startswith("[") and domain.endswith("]"):
        if not domain.isascii():
            raise _BadAddress(f"invalid address literal in {address!r}")
        ascii_domain = domain  # RFC 5321 §4.1.3 address literal
    else:
        ascii_domain = _a_label(domain)
    # RFC 6531 §3.3: a non-ASCII local part can only travel with SMTPUTF8.
    return _Envelope(f"{local}@{ascii_domain}".encode(), not local.isascii())


def _data_payload(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dot-stuffed, ended by CRLF.CRLF."""
    # RFC 5321 §2.3.8: lines end in CRLF; §4.5.2: a leading "." is doubled. Each pass only
    # when it has something to change (most messages need neither).
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        body = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    else:
        body = message
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b".") or b"\n." in body:
        body = re.sub(rb"(?m)^\.", b"..", body)
    return body + b".\r\n"


def parse_tls_policy(text: str) -> dict[str, TlsMode]:
    """Parse settings.tls_policy, `secure.test=verify,*.bank.test=require` (commas or
    newlines): an exact domain, `*.domain` for its subdomains, or `*` for every domain.
    Raises ValueError naming the bad entry."""
    policy: dict[str, TlsMode] = {}
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        pattern, sep, mode = (part.strip() for part in item.partition("="))
        if not sep or not pattern or mode not in TLS_MODES:
            raise ValueError(
                f"TLS policy entry {item.strip()!r} is not domain=" + "|".join(TLS_MODES)
            )
        if pattern != "*":
            wildcard = pattern.startswith("*.")
            try:
                domain = _a_label(pattern[2:] if wildcard else pattern).lower().rstrip(".")
            except _BadAddress as exc:
                raise ValueError(f"TLS policy entry {item.strip()!r}: {exc}") from None
            pattern = f"*.{domain}" if wildcard else domain
        policy[pattern] = mode
    return policy


def tls_mode_for(
    policy: Mapping[str, TlsMode], domain: str, default: TlsMode = "opportunistic"
) -> TlsMode:
    """The TLS mode for a recipient domain: exact match, else the longest `*.` suffix,
    else `*`, else `default`."""
    try:
        domain = _a_label(domain).lower().rstrip(".")
    except _BadAddress:
        return default
    if domain in policy:
        return policy[domain]
    best: str | None = None
    for pattern in policy:
        suffix = pattern.startswith("*.") and domain.endswith(pattern[1:])
        if suffix and (best is None or len(pattern) > len(best)):
            best = pattern
    if best is not None:
        return policy[best]
    return policy.get("*", default)


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    # RFC 7435: opportunistic security encrypts without authenticating the peer.
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def _verifying_context() -> ssl.SSLContext:
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH)


class _Protocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply that arrives: the replies to a pipelined
    group of commands (RFC 2920) may come in one segment, and aiosmtplib's own keeps only the
    first. Each `read_response` takes the oldest reply not yet taken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replies: deque[SMTPResponse | SMTPResponseException] = deque()
        self._reading = False

    def data_received(self, data: bytes) -> None:
        if self._response_waiter is None:  # the connection is gone
            return
        self._buffer.extend(data)
        try:
            while (response := self._read_response_from_buffer()) is not None:
                self._replies.append(response)
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                raise SMTPResponseException(500, "Response too long")
        except SMTPResponseException as exc:
            del self._buffer[:]
            self._replies.append(exc)
        waiter = self._response_waiter
        if self._reading and self._replies and not waiter.done():
            reply = self._replies.popleft()
            if isinstance(reply, SMTPResponseException):
                self._set_response_exception(waiter, reply)
            else:
                waiter.set_result(reply)

    def forget_unsolicited(self) -> None:
        """Drop what the server said unasked, before commands whose replies are to come
        (as aiosmtplib does): it must not be taken for their replies."""
        self._replies.clear()
        del self._buffer[:]

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        if self._replies:  # here already (before a drop, which is reported after them)
            reply = self._replies.popleft()
            if isinstance(reply, SMTPResponseException):
                raise reply
            return reply
        self._reading = True
        try:
            return await super().read_response(timeout)
        finally:
            self._reading = False


class SmtpSession:
    """One SMTP connection to one remote host, reused for several messages.

    ::

        async with SmtpSession("mx.dest.test", "192.0.2.25", 25, "mta.shop.test",
                               "opportunistic", SmtpTimeouts()) as session:
            result = await session.send("bounce+x@return.shop.test",
                                        ["alice@dest.test"], message_bytes)
            result.outcomes["alice@dest.test"]   # Delivered | SoftFail | HardFail

    Nothing here raises for network or protocol trouble: a failed connect, greeting,
    EHLO or TLS negotiation makes every send() return SoftFail (or HardFail for a 5xx)
    for each recipient, with the reason and the transcript so far.
    """

    def __init__(
        self,
        target_host: str,
        ip: str,
        port: int = 25,
        helo_name: str = "postbode.localhost",
        tls_mode: TlsMode = "opportunistic",
        timeouts: SmtpTimeouts | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """`target_host` is the MX host name (TLS SNI and certificate name, and what the
        attempt records); `ip` and `port` are where to connect. `tls_context` replaces
        the system CA store for ``verify`` (tests pass one trusting their own CA).
        """
        if tls_mode not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {tls_mode!r}; expected one of {TLS_MODES}")
        self.target_host = target_host
        self.ip = ip
        self.port = port
        if not helo_name or _FORBIDDEN.search(helo_name) or " " in helo_name:
            raise ValueError(f"invalid HELO name {helo_name!r}")
        self.helo_name = _a_label(helo_name)
        self.tls_mode: TlsMode = tls_mode
        self.timeouts = timeouts or SmtpTimeouts()
        self._tls_context = tls_context

        self._protocol: _Protocol | None = None
        self._transport: asyncio.Transport | None = None  # the TLS one once upgraded
        self._raw_transport: asyncio.Transport | None = None
        self._aborted = False
        self._lost = asyncio.Event()
        self._t0 = 0.0
        self._started_at = datetime.now(UTC)
        self._preamble: list[TranscriptLine] = []
        self._lines: list[TranscriptLine] = self._preamble
        self._extensions: dict[str, str] = {}
        self._failure: SoftFail | HardFail | None = None
        self._opened = False
        self._transactions = 0
        self._unfinished = False  # a transaction was begun and not ended by its final reply
        self._lock = asyncio.Lock()
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None

    # -- public state ------------------------------------------------------------------

    @property
    def failure(self) -> SoftFail | HardFail | None:
        """Why the session is unusable (None while it is usable)."""
        return self._failure

    @property
    def extensions(self) -> Mapping[str, str]:
        """EHLO keywords (upper case) and their parameters, as last advertised."""
        return dict(self._extensions)

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self._abandon()
        else:
            await self.close()

    async def open(self) -> None:
        """Connect, read the greeting, EHLO, STARTTLS per tls_mode. Never raises for
        network or protocol trouble: the failure is kept and reported by send()."""
        if self._opened:
            return
        self._opened = True
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._started_at = datetime.now(UTC)
        try:
            await self._connect_and_greet()
            await self._hello()
            await self._maybe_starttls()
        except _Broken as broken:
            self._failure = broken.outcome
            self._note(f"session failed: {broken.outcome.reason}")
            await self._abandon()

    async def close(self) -> None:
        """QUIT (RFC 5321 §4.1.1.10) and close the connection; never raises."""
        if self._protocol is not None and self._failure is None and not self._lost.is_set():
            with contextlib.suppress(
                SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError, OSError
            ):
                await self._protocol.execute_command(
                    b"QUIT", timeout=min(self.timeouts.command, _QUIT_TIMEOUT)
                )
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()
        if transport is not None and not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), _CLOSE_GRACE)
        await self._abandon()
        if self._failure is None:
            self._failure = _soft(None, "session closed")

    async def _abandon(self) -> None:
        """Drop the connection at once (after an error, where no QUIT makes sense)."""
        self._abort()
        if self._aborted:
            self._aborted = False
            # Let the transports' connection_lost callbacks run: they close the socket.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _abort(self) -> None:
        """Abort the transports without awaiting (safe while being cancelled)."""
        for transport in (self._transport, self._raw_transport):
            if transport is not None:
                transport.abort()
                self._aborted = True
        self._protocol = None
        self._transport = None
        self._raw_transport = None

    # -- transcript --------------------------------------------------------------------

    def _at(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    def _note(self, text: str) -> None:
        self._lines.append(TranscriptLine(self._at(), "*", text))

    def _client(self, text: str) -> None:
        self._lines.append(TranscriptLine(self._at(), "C", text))

    def _server(self, response: SMTPResponse) -> None:
        at = self._at()
        lines = response.message.split("\n")
        for index, line in enumerate(lines):
            separator = " " if index == len(lines) - 1 else "-"
            text = f"{response.code}{separator}{line}".rstrip()
            self._lines.append(TranscriptLine(at, "S", text))

    # -- the conversation --------------------------------------------------------------

    def _on_connection_lost(self, protocol: SMTPProtocol) -> None:
        if protocol is self._protocol:
            self._lost.set()

    async def _connect_and_greet(self) -> None:
        loop = asyncio.get_running_loop()
        self._lost = asyncio.Event()
        protocol = _Protocol(loop=loop, connection_lost_callback=self._on_connection_lost)
        self._protocol = protocol  # before connecting: a drop may be reported at once
        self._note(f"connecting to {self.ip} port {self.port} ({self.target_host})")
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: protocol, host=self.ip, port=self.port),
                self.timeouts.connect,
            )
        except TimeoutError:
            raise _Broken(
                _soft(None, f"connect timed out after {self.timeouts.connect:g} s")
            ) from None
        except OSError as exc:
            reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else ""
            raise _Broken(_soft(None, reason or f"connect failed: {exc}")) from None
        self._transport = self._raw_transport = transport
        self._note("connected")
        # RFC 5321 §4.5.3.2.1: wait for the 220 greeting; §3.1: 554 refuses the session.
        reply = await self._read("greeting", self.timeouts.command)
        if reply.code != 220:
            raise _Broken(_negative(reply, "greeting"))

    async def _hello(self) -> None:
        """EHLO, or HELO when EHLO gets a 5xx (RFC 5321 §3.2)."""
        self._extensions = {}
        reply = await self._command(b"EHLO " + self.helo_name.encode("ascii"), "EHLO")
        if reply.is_positive:
            # RFC 5321 §4.1.1.1: the first line greets, each further line is a keyword.
            for line in reply.text.split("\n")[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self._extensions[keyword.upper()] = params.strip()
            return
        if reply.code == 421 or not reply.is_permanent:
            raise _Broken(_negative(reply, "EHLO"))
        reply = await self._command(b"HELO " + self.helo_name.encode("ascii"), "HELO")
        if not reply.is_positive:
            raise _Broken(_negative(reply, "HELO"))

    async def _maybe_starttls(self) -> None:
        if self.tls_mode == "none":
            return
        required = self.tls_mode in ("require", "verify")
        if "STARTTLS" not in self._extensions:
            if required:
                self._note("STARTTLS not offered")
                raise _Broken(_soft(None, "STARTTLS required but not offered"))
            return
        if self.tls_mode == "verify":
            context = self._tls_context or _verifying_context()
        else:
            context = _unverified_context()
        protocol = self._protocol
        assert protocol is not None
        self._client("STARTTLS")
        try:
            response = await protocol.start_tls(
                context,
                # SNI and the certificate check use the MX host name, not the IP; a trailing
                # root dot would fail the name match.
                server_hostname=self.target_host.rstrip("."),
                timeout=self.timeouts.command,
            )
        except SMTPResponseException as exc:
            if not 200 <= exc.code <= 599:  # aiosmtplib marks unparsable replies -1
                raise _Broken(_soft(None, f"malformed reply to STARTTLS: {exc.message}")) from None
            reply = Reply.from_parts(exc.code, exc.message)
            self._server(SMTPResponse(exc.code, exc.message))
            if reply.code == 421 or required:
                raise _Broken(_negative(reply, "STARTTLS")) from None
            # RFC 3207 §4: after a refused STARTTLS the session goes on in plain text.
            self._note("STARTTLS refused; continuing without TLS")
            return
        except (ssl.SSLError, SMTPTimeoutError, SMTPServerDisconnected, OSError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"TLS certificate verification failed: {exc.verify_message}"
            elif isinstance(exc, SMTPTimeoutError):
                reason = f"STARTTLS timed out after {self.timeouts.command:g} s"
            else:
                reason = f"TLS negotiation failed: {exc}"
            self._note(reason)
            await self._abandon()
            if required:
                raise _Broken(_soft(None, reason)) from None
            # Opportunistic: a fresh connection in plain text (see TlsMode).
            self._note("retrying without TLS on a new connection")
            await self._connect_and_greet()
            await self._hello()
            return
        self._server(response)
        self._transport = cast(asyncio.Transport, protocol.transport)
        ssl_object = self._transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = cipher[0] if cipher else None
        self._note(f"TLS established: {self.tls_version} {self.tls_cipher}")
        # RFC 3207 §4.2: forget what we learned before TLS, and EHLO again.
        await self._hello()

    async def _read(self, what: str, timeout: float) -> Reply:
        """Await one reply; every network or protocol failure becomes _Broken."""
        protocol = self._protocol
        if protocol is None:
            raise _Broken(self._failure or _soft(None, "not connected"))
        try:
            response = await protocol.read_response(timeout=timeout)
        except SMTPTimeoutError:
            raise _Broken(
                _soft(None, f"timed out after {timeout:g} s waiting for {what}")
            ) from None
        except SMTPServerDisconnected:
            raise _Broken(_soft(None, f"connection lost waiting for {what}")) from None
        except SMTPResponseException as exc:
            raise _Broken(_soft(None, f"malformed {what}: {exc.message}")) from None
        except OSError as exc:
            raise _Broken(_soft(None, f"network error waiting for {what}: {exc}")) from None
        return self._reply(response, what)

    def _reply(self, response: SMTPResponse, what: str) -> Reply:
        self._server(response)
        if not 200 <= response.code <= 599:
            raise _Broken(_soft(None, f"malformed {what}: code {response.code}"))
        reply = Reply.from_parts(response.code, response.message)
        if reply.code == 421:
            # RFC 5321 §3.8: 421 means the server is closing the channel.
            raise _Broken(_soft(reply, f"server closing connection ({what})"))
        return reply

    async def _command(
        self, line: bytes, what: str, timeout: float | None = None, shown: str | None = None
    ) -> Reply:
        """Send one command line and await its reply."""
        protocol = self._protocol
        if protocol is None or self._lost.is_set():
            raise _Broken(self._failure or _soft(None, "connection lost"))
        self._client(shown if shown is not None else line.decode("utf-8", "replace"))
        protocol.forget_unsolicited()
        try:
            protocol.write(line + b"\r\n")
        except (SMTPServerDisconnected, OSError):
            raise _Broken(_soft(None, f"connection lost sending {what}")) from None
        return await self._read(f"reply to {what}", timeout or self.timeouts.command)

    # -- sending -----------------------------------------------------------------------

    async def send(self, mail_from: str, rcpts: Sequence[str], message: bytes) -> SendResult:
        """One SMTP transaction: MAIL, RCPT per recipient, DATA. Never raises for
        network or protocol trouble; every recipient gets exactly one outcome."""
        async with self._lock:
            if not self._opened:
                await self.open()
            loop = asyncio.get_running_loop()
            first = self._transactions == 0
            started_at = self._started_at if first else datetime.now(UTC)
            start = self._t0 if first else loop.time()
            self._lines = list(self._preamble)
            recipients = list(dict.fromkeys(rcpts))
            outcomes: dict[str, Outcome] = {}
            state = _Transaction()
            session_error: str | None = None
            try:
                await self._transaction(mail_from, recipients, message, outcomes, state)
            except _Broken as broken:
                session_error = broken.outcome.reason
                self._failure = self._failure or broken.outcome
                # The reply that broke the session (None after a timeout or a drop).
                state.final_reply = broken.outcome.reply
                if not self._lines or self._lines[-1].text != f"session failed: {session_error}":
                    self._note(f"session failed: {session_error}")
                for rcpt in recipients:
                    outcomes.setdefault(rcpt, broken.outcome)
                await self._abandon()
            except asyncio.CancelledError:
                # Cut off mid-conversation: the connection's state is unknown, so it is
                # dropped rather than reused (no QUIT either).
                self._failure = self._failure or _soft(None, "send cancelled")
                self._abort()
                raise
            finally:
                self._transactions += 1
                transcript = tuple(self._lines)
                self._lines = self._preamble
            attempt = Attempt(
                mx_host=self.target_host,
                ip=self.ip,
                port=self.port,
                started_at=started_at,
                duration=loop.time() - start,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
                final_reply=state.final_reply,
                transcript=transcript,
            )
            return SendResult(
                outcomes={rcpt: outcomes[rcpt] for rcpt in recipients},
                attempt=attempt,
                session_error=session_error,
                message_sent=state.message_sent,
            )

    async def _transaction(
        self,
        mail_from: str,
        recipients: list[str],
        message: bytes,
        outcomes: dict[str, Outcome],
        state: _Transaction,
    ) -> None:
        if self._failure is not None:
            raise _Broken(self._failure)
        if not recipients:
            return

        # Local checks first: nothing here would ever succeed on a retry.
        try:
            sender = _envelope(mail_from)
        except _BadAddress as exc:
            for rcpt in recipients:
                outcomes[rcpt] = HardFail(None, f"invalid sender: {exc}")
            return
        smtputf8 = "SMTPUTF8" in self._extensions
        if sender.needs_smtputf8 and not smtputf8:
            for rcpt in recipients:
                outcomes[rcpt] = HardFail(
                    None, "SMTPUTF8 needed for the sender address but not offered (RFC 6531)"
                )
            return
        envelopes: dict[str, _Envelope] = {}
        for rcpt in recipients:
            try:
                envelope = _envelope(rcpt)
            except _BadAddress as exc:
                outcomes[rcpt] = HardFail(None, f"invalid recipient: {exc}")
                continue
            if envelope.needs_smtputf8 and not smtputf8:
                outcomes[rcpt] = HardFail(
                    None, "SMTPUTF8 needed for the recipient address but not offered (RFC 6531)"
                )
                continue
            envelopes[rcpt] = envelope
        if not envelopes:
            return
        size_limit = self._extensions.get("SIZE", "")
        if size_limit.isdigit() and 0 < int(size_limit) < len(message):
            # RFC 1870 §6.1: over the advertised fixed limit the message cannot go.
            for rcpt in envelopes:
                outcomes[rcpt] = HardFail(
                    None,
                    f"message of {len(message)} bytes exceeds the server's limit of "
                    f"{size_limit} bytes (RFC 1870)",
                )
            return

        params = b""
        if "SIZE" in self._extensions:
            params += b" SIZE=%d" % len(message)  # RFC 1870 §6
        if "8BITMIME" in self._extensions and not message.isascii():
            params += b" BODY=8BITMIME"  # RFC 6152 §3
        if smtputf8 and (
            sender.needs_smtputf8 or any(e.needs_smtputf8 for e in envelopes.values())
        ):
            params += b" SMTPUTF8"  # RFC 6531 §3.4
        commands = [(b"MAIL FROM:<" + sender.wire + b">" + params, "MAIL FROM")]
        commands += [(b"RCPT TO:<" + e.wire + b">", "RCPT TO") for e in envelopes.values()]
        commands.append((b"DATA", "DATA"))
        if self._unfinished:
            # RFC 5321 §4.1.1.5: the last transaction on this connection was not finished by
            # the reply to its end of data, so RSET clears it before the next one.
            commands.insert(0, (b"RSET", "RSET"))
        self._unfinished = True
        # RFC 2920: where PIPELINING is offered, the whole group goes in one write and the
        # replies are read after; otherwise each command waits for its reply.
        replies = await self._pipeline(commands) if "PIPELINING" in self._extensions else None

        async def reply_to(i: int) -> Reply:
            return replies[i] if replies is not None else await self._command(*commands[i])

        i = 0
        if commands[0][0] == b"RSET":
            reply = await reply_to(0)
            if not reply.is_positive:
                raise _Broken(_negative(reply, "RSET"))
            i = 1
        reply = await reply_to(i)
        state.final_reply = reply
        if not reply.is_positive:
            outcome = _negative(reply, "MAIL FROM")
            for rcpt in envelopes:
                outcomes[rcpt] = outcome
            await self._end_unwanted_data(replies)
            return

        accepted: list[str] = []
        try:
            for rcpt in envelopes:
                i += 1
                reply = await reply_to(i)
                state.final_reply = reply
                if reply.is_positive:
                    accepted.append(rcpt)
                else:
                    outcomes[rcpt] = _negative(reply, "RCPT TO")
            if not accepted:
                await self._end_unwanted_data(replies)
                return

            reply = await reply_to(i + 1)
            state.final_reply = reply
            if reply.code != 354:
                outcome = _negative(reply, "DATA")
                for rcpt in accepted:
                    outcomes[rcpt] = outcome
                return

            protocol = self._protocol
            assert protocol is not None
            self._client(f"<message body, {len(message)} bytes>")
            state.message_sent = True
            try:
                protocol.write(_data_payload(message))
            except (SMTPServerDisconnected, OSError):
                raise _Broken(_soft(None, "connection lost sending the message")) from None
            # RFC 5321 §4.5.3.2.6: the reply to "." may take long (content scanning).
            reply = await self._read("reply to end of data", self.timeouts.data_termination)
            self._unfinished = False
            state.final_reply = reply
            if reply.is_positive:
                for rcpt in accepted:
                    outcomes[rcpt] = Delivered(reply)
            else:
                outcome = _negative(reply, "message")
                for rcpt in accepted:
                    outcomes[rcpt] = outcome
        except _Broken as broken:
            # Recipients already refused keep their own outcome; the rest share this one.
            for rcpt in envelopes:
                outcomes.setdefault(rcpt, broken.outcome)
            raise

    async def _pipeline(self, commands: list[tuple[bytes, str]]) -> list[Reply]:
        """Send a group of commands in one write, then read one reply to each, in order."""
        protocol = self._protocol
        if protocol is None or self._lost.is_set():
            raise _Broken(self._failure or _soft(None, "connection lost"))
        for line, _ in commands:
            self._client(line.decode("utf-8", "replace"))
        protocol.forget_unsolicited()
        try:
            protocol.write(b"".join(line + b"\r\n" for line, _ in commands))
        except (SMTPServerDisconnected, OSError):
            raise _Broken(_soft(None, f"connection lost sending {commands[0][1]}")) from None
        return [await self._read(f"reply to {what}", self.timeouts.command) for _, what in commands]

    async def _end_unwanted_data(self, replies: list[Reply] | None) -> None:
        """RFC 2920 §3.1: a pipelined DATA that was answered 354 although no recipient was
        taken gets an empty message, which ends the transaction with nothing sent."""
        if replies is None or replies[-1].code != 354:
            return
        protocol = self._protocol
        assert protocol is not None
        self._client(".")
        try:
            protocol.write(b".\r\n")
        except (SMTPServerDisconnected, OSError):
            raise _Broken(_soft(None, "connection lost ending an empty message")) from None
        await self._read("reply to end of data", self.timeouts.data_termination)
        self._unfinished = False


@dataclass(slots=True)
class _Transaction:
    final_reply: Reply | None = field(default=None)
    message_sent: bool = False


async def send_message(
    target_host: str,
    ip: str,
    port: int,
    helo_name: str,
    tls_mode: TlsMode,
    timeouts: SmtpTimeouts,
    mail_from: str,
    rcpts: Sequence[str],
    message: bytes,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> SendResult:
    """One message on its own connection (a session with a single transaction)."""
    async with SmtpSession(
        target_host, ip, port, helo_name, tls_mode, timeouts, tls_context=tls_context
    ) as session:
        return await session.send(mail_from, rcpts, message)


@dataclass(frozen=True)
class TlsPolicy:
    """Per-destination TLS modes from a setting like `secure.test=verify,*.bank.test=require`."""

    rules: tuple[tuple[str, TlsMode], ...]

    @classmethod
    def parse(cls, text: str) -> TlsPolicy:
        rules: list[tuple[str, TlsMode]] = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            pattern, _, mode = item.partition("=")
            if mode not in ("none", "opportunistic", "require", "verify"):
                raise ValueError(f"tls_policy: unknown mode {mode!r} for {pattern!r}")
            rules.append((pattern.strip().lower(), mode))  # type: ignore[arg-type]
        return cls(tuple(rules))

    def mode_for(self, domain: str) -> TlsMode:
        for pattern, mode in self.rules:
            if pattern == domain or (pattern.startswith("*.") and domain.endswith(pattern[1:])):
                return mode
        return "opportunistic"
