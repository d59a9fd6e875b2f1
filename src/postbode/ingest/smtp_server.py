"""The SMTP listener: authenticated submission for apps, and unauthenticated mail only for
Postbode's own addresses (return path, inbound routes). Never an open relay."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from postbode.config import Settings
from postbode.ingest.accept import AcceptError, Acceptor, Submission, TemporaryAcceptError
from postbode.ingest.auth_throttle import FAILED, IP_BLOCKED, AuthThrottle
from postbode.ingest.smtp_data import TOO_BIG, DataReader
from postbode.metrics import REJECTS
from postbode.store.engine import Store

log = logging.getLogger(__name__)

# Messages taken without AUTH that are read into memory and handed on at once; the others wait
# with theirs in the spool. Bounds the memory strangers can make a listener hold.
UNAUTHENTICATED_AT_ONCE = 4


@dataclass(frozen=True)
class Client:
    """The SMTP client that handed over a message without AUTH (for SPF and trace headers)."""

    ip: str
    helo: str | None
    tls: bool


class LocalMailbox(Protocol):
    """Mail Postbode receives for itself, without authentication (bounces, inbound routes)."""

    def owns(self, address: str) -> bool:
        """Whether `address` is one of this mailbox's (a cheap check, no I/O)."""

    async def check_recipient(self, address: str) -> str | None:
        """None to accept the recipient, or the SMTP reply refusing it."""

    async def receive(
        self, mail_from: str, rcpt_tos: Sequence[str], data: bytes, client: Client | None = None
    ) -> str:
        """Take the message; returns the SMTP reply."""


@dataclass
class _Login:
    """What a successful AUTH leaves on the session."""

    app_id: int
    username: str


class UnauthenticatedSessions:
    """This listener's sessions in a mail transaction without AUTH, per client address and in
    all: past either cap, the next is turned away. (Memory is a process's own: the caps are
    per listener process.)"""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._by_ip: dict[str, int] = {}
        self._count = 0

    def admit(self, ip: str) -> bool:
        if self._count >= self.total or self._by_ip.get(ip, 0) >= self.per_ip:
            return False
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        self._count += 1
        return True

    def leave(self, ip: str) -> None:
        left = self._by_ip.get(ip, 0) - 1
        if left < 0:
            return
        if left:
            self._by_ip[ip] = left
        else:
            del self._by_ip[ip]
        self._count -= 1

    def __len__(self) -> int:
        return self._count


# RFC 2034 / RFC 3463: when ENHANCEDSTATUSCODES is offered, replies carry a status code.
# aiosmtpd's own replies mostly don't; these are the codes its replies map to.
_ENHANCED_FOR = {
    "250": "2.0.0",
    "221": "2.0.0",
    "252": "2.5.0",
    "421": "4.7.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_UNPRINTABLE = re.compile(r"[^\t\x20-\x7e\r\n]|\r(?!\n)|(?<!\r)\n")
# RFC 5321 §4.1.1.1: EHLO names a domain or an address literal.
_EHLO_NAME = re.compile(r"^(?:\[[0-9A-Fa-f:.]+(?:IPv6:[0-9A-Fa-f:.]+)?\]|[A-Za-z0-9_.-]{1,255})$")
# RFC 5321 §4.1.2: "<" Dot-string "@" Domain ">", in its plain ASCII form.
_PLAIN_ANGLE_ADDR = re.compile(
    r"^<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\.)*[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)$",
    re.DOTALL,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")


class PostbodeSMTP(SMTP):
    """aiosmtpd's protocol with Postbode's policies: enhanced status codes on every reply,
    PIPELINING advertised, AUTH without TLS only from loopback."""

    def __init__(
        self,
        handler: SubmissionHandler,
        settings: Settings,
        spool_dir: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._postbode_handler = handler
        self._postbode_settings = settings
        self._spool_dir = spool_dir
        self._in_ehlo = False
        # The client address this session was counted under in UnauthenticatedSessions.
        self.counted_as: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._auth_require_tls = auth_requires_tls(
            str(peer[0]) if peer else "", self._auth_require_tls
        )

    def connection_lost(self, error: Exception | None) -> None:
        self._postbode_handler.acceptor.withdraw(self)
        if self.counted_as is not None:
            self._postbode_handler.sessions.leave(self.counted_as)
            self.counted_as = None
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read as it streams in (aiosmtpd's own buffers every line, as an object of its
        own, before it checks the size): at most a small buffer in memory, the rest in a
        spool file; past the limit nothing more is kept and 552 is answered at once, and what
        the client still sends is read and dropped up to its end-of-data line."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler = self._postbode_handler
        authenticated = bool(self.session.authenticated)
        if authenticated:
            limit = self._postbode_settings.smtp_max_message_size
        else:
            limit = self._postbode_settings.smtp_max_unauthenticated_message_size
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = DataReader(limit, self._spool_dir)

        async def refuse(why: str) -> None:
            REJECTS.labels("smtp", why).inc()
            if why == TOO_BIG:
                # RFC 3463 §3.4: X.3.4 message too big for system.
                whose = "" if authenticated else " without authentication"
                await self.push(f"552 5.3.4 Message too big: at most {limit} bytes{whose}")
            else:
                await self.push("500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)")

        try:
            try:
                await data.read(self._reader, refuse)
            except asyncio.IncompleteReadError:
                return  # the client left during DATA
            if data.scanner.refusal is not None:
                self.envelope = Envelope()
                return
            slot = contextlib.nullcontext() if authenticated else handler.unauthenticated_at_once
            async with slot:
                content = data.message()
                data.close()
                self.envelope.content = self.envelope.original_content = content
                status = await handler.handle_DATA(self, self.session, self.envelope)
        finally:
            data.close()
            handler.acceptor.withdraw(self)
        self.envelope = Envelope()
        await self.push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL and RCPT address with the e-mail package's full RFC 5322
        # parser (a fifth of an SMTP message's CPU); the plain <local@domain> form is the rule.
        found = _PLAIN_ANGLE_ADDR.match(arg)
        if found:
            return found[1], found[2].lstrip()
        address, rest = super()._getaddr(arg)
        return address, rest

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            # RFC 5321 §4.2: reply text is printable ASCII and tabs; aiosmtpd echoes a
            # client's command into some replies, control characters and all.
            status = _UNPRINTABLE.sub("?", status)
            if not self._in_ehlo:
                status = _with_enhanced_code(status)
        await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            # RFC 5321 §3.8: 421 says the server closes the channel; so it does.
            self.transport.close()


def _with_enhanced_code(status: str) -> str:
    code = status[:3]
    if status[3:4] == " " and code in _ENHANCED_FOR and not _HAS_ENHANCED.match(status):
        return f"{code} {_ENHANCED_FOR[code]} {status[4:]}"
    return status


def auth_requires_tls(peer_ip: str, setting: bool) -> bool:
    """Whether a client at `peer_ip` must STARTTLS before AUTH: as the setting says, except
    on loopback, where the client is as private as TLS would make it."""
    return setting and not _is_loopback(peer_ip)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class SubmissionHandler:
    """aiosmtpd handler: AUTH against app credentials, then everything goes to the Acceptor."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        acceptor: Acceptor,
        local: Sequence[LocalMailbox] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.acceptor = acceptor
        self.local = list(local)
        self.throttle = AuthThrottle(settings, store)
        self.sessions = UnauthenticatedSessions(
            settings.smtp_max_unauthenticated_sessions,
            settings.smtp_max_unauthenticated_sessions_per_ip,
        )
        self.unauthenticated_at_once = asyncio.Semaphore(UNAUTHENTICATED_AT_ONCE)

    # -- EHLO ----------------------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if not _EHLO_NAME.match(hostname):
            session.host_name = None  # no valid greeting yet: MAIL gets "503 send EHLO first"
            return ["501 5.5.4 EHLO needs a domain name or an address literal"]
        session.host_name = hostname
        self.acceptor.withdraw(server)  # EHLO resets the transaction (RFC 5321 §4.1.4)
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        if not _EHLO_NAME.match(hostname):
            return "501 5.5.4 HELO needs a domain name or an address literal"
        session.host_name = hostname
        self.acceptor.withdraw(server)
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.acceptor.withdraw(server)
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        """A command aiosmtpd could not parse (its address parser raises on some garbage)."""
        if isinstance(error, (IndexError, ValueError, UnicodeError)):
            log.warning("SMTP command could not be parsed: %r", error)
            return "501 5.5.4 Syntax error in parameters or arguments"
        log.exception("SMTP session error")
        return "451 4.3.0 Local error in processing"

    # -- AUTH ----------------------------------------------------------------------------------

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> str | None:
        """AUTH PLAIN and LOGIN (RFC 4954), checked off the event loop (argon2 is slow)."""
        ip = _peer_ip(session)
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, self.throttle.ip_blocked, ip):
            REJECTS.labels("smtp", "auth_throttled").inc()
            await server.push(IP_BLOCKED.refusal or "")  # 421: push() hangs up
            return None
        mechanism = args[0].upper()
        credentials = await _read_credentials(server, mechanism, args[1:])
        if credentials is None:
            return None  # a syntax reply was already sent
        username, password = credentials
        outcome = await loop.run_in_executor(None, self.throttle.login, ip, username, password)
        if outcome.app_id is None:
            failed = outcome.refusal == FAILED.refusal
            REJECTS.labels("smtp", "auth_failed" if failed else "auth_throttled").inc()
            if outcome.close:
                await server.push(outcome.refusal or "")
                return None
            return outcome.refusal
        session.authenticated = True
        session.auth_data = _Login(outcome.app_id, username)  # type: ignore[assignment]
        return "235 2.7.0 Authentication successful"

    # -- envelope ------------------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address and not _storable_address(address):
            return "553 5.1.7 Sender address is not valid"
        if not session.authenticated:
            limit = self.settings.smtp_max_unauthenticated_message_size
            if _declared_size(mail_options) > limit:
                REJECTS.labels("smtp", TOO_BIG).inc()
                return f"552 5.3.4 Message too big: at most {limit} bytes without authentication"
            if isinstance(server, PostbodeSMTP) and server.counted_as is None:
                ip = _peer_ip(session)
                if not self.sessions.admit(ip):
                    REJECTS.labels("smtp", "too_many_sessions").inc()
                    return "421 4.7.0 Too many sessions without authentication, try again later"
                server.counted_as = ip
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        if session.authenticated:
            # Its message may follow in a few round trips: a group commit waits a moment.
            self.acceptor.announce(server)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if "@" not in address or not _storable_address(address):
            return "553 5.1.3 Recipient address must be user@domain"
        if len(envelope.rcpt_tos) >= self.settings.smtp_max_recipients:
            REJECTS.labels("smtp", "too_many_recipients").inc()
            return "452 4.5.3 Too many recipients"
        if session.authenticated:
            if any(m.owns(r) for m in self.local for r in envelope.rcpt_tos):
                return "452 4.5.3 Send mail for Postbode's own addresses separately"
        else:
            mailbox = next((m for m in self.local if m.owns(address)), None)
            if mailbox is None:
                REJECTS.labels("smtp", "relay_denied").inc()
                if envelope.rcpt_tos:
                    return "550 5.7.1 Relaying denied"
                # A relay attempt, or an application that forgot to authenticate: say both.
                return "554 5.7.1 Relaying denied: authenticate to send to other domains"
            if envelope.rcpt_tos and not mailbox.owns(envelope.rcpt_tos[0]):
                return "452 4.5.3 Send mail for these addresses separately"
            refusal = await mailbox.check_recipient(address)
            if refusal:
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient ok"

    # -- DATA ----------------------------------------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if not session.authenticated:
            mailbox = next(m for m in self.local if m.owns(envelope.rcpt_tos[0]))
            client = Client(_peer_ip(session), session.host_name, session.ssl is not None)
            return await mailbox.receive(envelope.mail_from or "", envelope.rcpt_tos, data, client)
        login = session.auth_data
        assert isinstance(login, _Login)
        submission = Submission(
            app_id=login.app_id,
            source="smtp",
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            raw=data,
            client_ip=_peer_ip(session),
            client_name=session.host_name,
            credential=login.username,
        )
        try:
            accepted = await self.acceptor.accept(submission, server)
        except AcceptError as exc:
            return exc.smtp_reply()
        except TemporaryAcceptError as exc:
            return f"451 4.3.0 {exc}"
        return f"250 2.0.0 Ok: queued as {accepted.id}"


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE a client declared on MAIL (RFC 1870 §6); 0 when none."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def _storable_address(address: str) -> bool:
    """No control characters, no bytes that were not UTF-8 (RFC 6531 allows UTF-8, nothing
    else), and within RFC 5321 §4.5.3.1's lengths."""
    if len(address) > 320 or _CONTROL.search(address):
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes from a non-UTF-8 client
        return False
    return True


def _peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


async def _read_credentials(
    server: SMTP, mechanism: str, args: list[str]
) -> tuple[str, str] | None:
    """(username, password) from an AUTH exchange; None after answering a protocol error."""

    def decode(value: str) -> bytes | None:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None

    if mechanism == "PLAIN":
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd
        if args:
            blob = decode(args[0])
        else:
            challenge = await server.challenge_auth("")
            blob = None if challenge is MISSING else challenge
        parts = blob.split(b"\x00") if isinstance(blob, bytes) else []
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot decode AUTH PLAIN data")
            return None
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
    if mechanism == "LOGIN":
        if args:
            login = decode(args[0])
        else:
            answer = await server.challenge_auth("User Name\x00")
            login = None if answer is MISSING else answer
        if not isinstance(login, bytes):
            await server.push("501 5.5.2 Cannot decode AUTH LOGIN data")
            return None
        password = await server.challenge_auth("Password\x00")
        if not isinstance(password, bytes):
            await server.push("501 5.5.2 Cannot decode AUTH LOGIN data")
            return None
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
    await server.push("504 5.5.4 Unrecognized authentication type")
    return None


def _refuse_builtin_auth(*_args: Any) -> AuthResult:
    # handle_AUTH does the work; aiosmtpd only needs an authenticator to exist.
    return AuthResult(success=False)


async def start_server(
    settings: Settings,
    store: Store,
    acceptor: Acceptor,
    local: Sequence[LocalMailbox] = (),
    *,
    tls_context: ssl.SSLContext | None = None,
    host: str | None = None,
    port: int | None = None,
) -> asyncio.Server:
    """Listen for SMTP; returns the asyncio server (its sockets tell the bound port)."""
    from postbode.ingest.tls import server_context

    handler = SubmissionHandler(settings, store, acceptor, local)
    context = tls_context or server_context(settings)
    # Spooled messages go beside the store (a real disk, where /tmp may be memory).
    spool_dir = settings.data_dir if settings.data_dir.is_dir() else None

    def protocol() -> PostbodeSMTP:
        return PostbodeSMTP(
            handler,
            settings,
            spool_dir,
            hostname=settings.smtp_hostname,
            ident="Postbode",
            data_size_limit=settings.smtp_max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=context,
            auth_require_tls=settings.smtp_auth_require_tls,
            authenticator=_refuse_builtin_auth,
            timeout=300,
        )

    loop = asyncio.get_running_loop()
    return await loop.create_server(
        protocol,
        host=host if host is not None else settings.smtp_host,
        port=port if port is not None else settings.smtp_port,
        reuse_address=True,
        reuse_port=settings.listeners > 1,  # shared with the other listener processes
    )
