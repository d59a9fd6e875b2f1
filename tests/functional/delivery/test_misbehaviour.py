"""Remote MTAs that misbehave: odd replies, silence, endless lines, odd MX records, IDN domains."""

from __future__ import annotations

import asyncio
import errno
import random
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from types import TracebackType
from typing import Any

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import attempts, deliveries, events
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import LoopThread, PostbodeInProcess, StartPostbode, submit
from postbode.testing.sink import Rule, SmtpSink, Stage

TIMEOUT = 1.0  # client timeouts for the silent peers: short, but ample for a loaded CI machine
IDN_DOMAIN = "bücher.test"
IDN_A_LABEL = "xn--bcher-kva.test"


# -- a raw SMTP peer that can misbehave more than aiosmtpd allows ---------------------------------

# One stage of a raw conversation: bytes to send as the answer, or a coroutine that takes the
# stream writer and misbehaves as it likes (never answering, flooding, ...).
Answer = bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]

_DEFAULTS: dict[str, bytes] = {
    "greeting": b"220 raw.test ESMTP\r\n",
    "EHLO": b"250-raw.test\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n",
    "HELO": b"250 raw.test\r\n",
    "MAIL": b"250 2.1.0 OK\r\n",
    "RCPT": b"250 2.1.5 OK\r\n",
    "DATA": b"354 Go ahead\r\n",
    "end-of-data": b"250 2.0.0 OK\r\n",
    "RSET": b"250 2.0.0 OK\r\n",
    "NOOP": b"250 2.0.0 OK\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
}


async def never_answer(writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()  # until the client gives up and the server is stopped


async def endless_line(writer: asyncio.StreamWriter) -> None:
    """A reply line that never ends: "250-" and then kilobytes of text without a line break."""
    writer.write(b"250-")
    while True:
        writer.write(b"x" * 4096)
        await writer.drain()  # raises once the client hangs up


async def trickling_line(writer: asyncio.StreamWriter) -> None:
    """A reply line that never ends, a few bytes at a time, well inside any size limit."""
    writer.write(b"250-")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


class RawMx:
    """A bare asyncio TCP server on a random 127.x.y.z port 25 (an MX host the loopback DNS
    names), speaking just enough SMTP for a delivery, with any stage replaced by `answers`.
    Records every line the client sent."""

    def __init__(self, **answers: Answer) -> None:
        self.answers: dict[str, Answer] = {**_DEFAULTS, **answers}
        self.host = ""
        self.lines: list[str] = []
        self.connections = 0
        # Python 3.11's start_server keeps no reference to the conversation tasks: a silent
        # one would be garbage-collected mid-wait (and its socket reported unclosed).
        self._conversations: set[asyncio.Task[None]] = set()
        self._thread: LoopThread | None = None
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RawMx:
        self._thread = LoopThread()
        self._server = self._thread.run(self._listen())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._thread is not None and self._server is not None
        self._server.close()
        self._thread.close()  # cancels the conversations still running

    async def _listen(self) -> asyncio.Server:
        for _ in range(50):
            host = ".".join(["127", *(str(random.randint(1, 254)) for _ in range(3))])
            try:
                server = await asyncio.start_server(self._converse, host, 25)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self.host = host
            return server
        raise RuntimeError("no free loopback address for a raw MX")

    async def _answer(self, stage: str, writer: asyncio.StreamWriter) -> None:
        answer = self.answers[stage]
        if isinstance(answer, bytes):
            writer.write(answer)
            await writer.drain()
        else:
            await answer(writer)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._conversations.add(task)
        try:
            await self._answer("greeting", writer)
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(text)
                verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
                await self._answer(verb if verb in self.answers else "NOOP", writer)
                if verb == "DATA":
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    await self._answer("end-of-data", writer)
                elif verb == "QUIT":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up on us: that is what misbehaving peers get
        finally:
            writer.close()
            self._conversations.discard(task)


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def start_postbode(start_postbode: StartPostbode) -> StartPostbode:
    """Postbode in-process with small client timeouts (and any other overrides)."""

    def start(**overrides: Any) -> PostbodeInProcess:
        timeouts = {
            "smtp_connect_timeout": TIMEOUT,
            "smtp_command_timeout": TIMEOUT,
            "smtp_data_timeout": TIMEOUT,
        }
        return start_postbode(**{**timeouts, **overrides})

    return start


def mx(dns_server: LoopbackDNS, domain: str, *hosts: str) -> None:
    """MX records for `domain`: the given addresses in order of preference (10, 20, ...)."""
    names = [f"mx{i}.{domain}" for i in range(1, len(hosts) + 1)]
    dns_server.add_mx(domain, [(10 * i, name) for i, name in enumerate(names, 1)])
    for name, host in zip(names, hosts, strict=True):
        dns_server.add_a(name, host)


def message(to: str, subject: str = "Hi") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Your order has shipped.")
    return msg


def delivery(store: Store, recipient: str) -> dict[str, Any]:
    with store.read() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.recipient == recipient))
        return dict(row.mappings().one())


def status_of(store: Store, recipient: str) -> str | None:
    with store.read() as conn:
        return conn.execute(
            select(deliveries.c.status).where(deliveries.c.recipient == recipient)
        ).scalar()


def wait_status(store: Store, recipient: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    """Poll the store (nothing else announces its changes) until the delivery has `status`."""
    deadline = time.monotonic() + timeout
    while (now := status_of(store, recipient)) != status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{recipient} not {status} within {timeout}s (is {now})")
        time.sleep(0.02)
    return delivery(store, recipient)


def event_reason(store: Store, recipient: str, event: str) -> str:
    with store.read() as conn:
        data = conn.execute(
            select(events.c.data).where(events.c.recipient == recipient, events.c.type == event)
        ).scalar_one()
    return str(data["reason"])


def only_attempt(store: Store, delivery_id: Any) -> dict[str, Any]:
    with store.read() as conn:
        return dict(
            conn.execute(select(attempts).where(attempts.c.delivery_id == delivery_id))
            .mappings()
            .one()
        )


def assert_worker_unharmed(postbode: PostbodeInProcess, store: Store) -> None:
    """No crash: the worker loop still runs, and no delivery was parked with a traceback."""
    assert postbode._tasks and not postbode._tasks[0].done(), "the delivery worker stopped"
    with store.read() as conn:
        parked = conn.execute(
            select(deliveries.c.recipient, deliveries.c.error).where(
                deliveries.c.error.is_not(None)
            )
        ).all()
    assert parked == [], "a remote's misbehaviour must be an outcome, never a parked bug"


# -- replies that are odd but valid ------------------------------------------------------------


def test_multi_line_replies_are_read_whole(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback() as sink:
        mx(dns_server, "dest.test", sink.host)
        sink.script.add(
            Rule.connect("220-mx.dest.test ESMTP\n220-No unsolicited mail\n220 Welcome"),
            Rule.rcpt(
                "gone@dest.test",
                "550-5.1.1 The account you tried to reach does not exist.\n"
                "550-5.1.1 Please check the address\n"
                "550 5.1.1 and try again.",
            ),
            Rule.data("250-2.0.0 Queued\n250 2.0.0 as 1234", match="alice@dest.test"),
        )
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        submit(postbode, shop, message("gone@dest.test"))
        alice = wait_status(store, "alice@dest.test", "delivered")
        gone = wait_status(store, "gone@dest.test", "bounced")
        assert alice["last_reply"] == "250 2.0.0 Queued as 1234"
        assert gone["last_reply"] == (
            "550 5.1.1 The account you tried to reach does not exist. "
            "Please check the address and try again."
        )
        assert (gone["bounce_category"], gone["bounce_status"]) == ("user_unknown", "5.1.1")
        assert "220-No unsolicited mail" in only_attempt(store, alice["id"])["transcript"]
        assert_worker_unharmed(postbode, store)


# -- replies that are not SMTP ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"greeting": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"}, "malformed greeting"),
        ({"MAIL": b"hello there\r\n"}, "malformed reply to MAIL FROM"),
        ({"RCPT": b"999 9.9.9 What\r\n"}, "malformed reply to RCPT TO"),
        ({"end-of-data": b"250-2.0.0 OK\r\n251 but the code changed\r\n"}, None),
    ],
    ids=["not-smtp-greeting", "no-code", "code-out-of-range", "code-changes-mid-reply"],
)
def test_malformed_reply_is_a_soft_fail(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    dns_server: LoopbackDNS,
    store: Store,
    answers: dict[str, Answer],
    reason: str | None,
) -> None:
    with RawMx(**answers) as raw:
        mx(dns_server, "dest.test", raw.host)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        if reason is None:
            # RFC 5321 §4.2.1 wants one code per reply; a 2xx reply that changes its code
            # still accepted the message, and refusing it now would only cause a duplicate.
            row = wait_status(store, "alice@dest.test", "delivered")
            assert row["last_reply"].startswith("25")
        else:
            row = wait_status(store, "alice@dest.test", "deferred")
            assert event_reason(store, "alice@dest.test", "delivery.deferred").startswith(reason)
            assert only_attempt(store, row["id"])["outcome"] == "SoftFail"
        assert_worker_unharmed(postbode, store)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (endless_line, "malformed reply to EHLO: Response too long"),
        (trickling_line, f"timed out after {TIMEOUT:g} s waiting for reply to EHLO"),
    ],
    ids=["flood", "trickle"],
)
def test_reply_line_that_never_ends_is_a_soft_fail(
    start_postbode: StartPostbode,
    shop: tenancy.NewApp,
    dns_server: LoopbackDNS,
    store: Store,
    answer: Answer,
    reason: str,
) -> None:
    with RawMx(EHLO=answer) as raw:
        mx(dns_server, "dest.test", raw.host)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        row = wait_status(store, "alice@dest.test", "deferred")
        assert event_reason(store, "alice@dest.test", "delivery.deferred") == reason
        attempt = only_attempt(store, row["id"])
        # Whatever the peer sent, what we keep of it stays small.
        assert len(attempt["transcript"]) < 64 * 1024
        assert_worker_unharmed(postbode, store)


def test_banner_that_never_comes_times_out_and_the_next_mx_gets_the_mail(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with RawMx(greeting=never_answer) as silent, SmtpSink.on_random_loopback() as backup:
        mx(dns_server, "dest.test", silent.host, backup.host)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        (received,) = backup.wait_for_sync(1, timeout=15)
        row = wait_status(store, "alice@dest.test", "delivered")
        assert silent.connections == 1 and silent.lines == []
        assert row["mx"] == "mx2.dest.test" and received.rcpt_tos == ("alice@dest.test",)
        assert_worker_unharmed(postbode, store)


def test_banner_that_never_comes_from_the_only_mx_defers(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with RawMx(greeting=never_answer) as silent:
        mx(dns_server, "dest.test", silent.host)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        wait_status(store, "alice@dest.test", "deferred")
        assert event_reason(store, "alice@dest.test", "delivery.deferred") == (
            f"timed out after {TIMEOUT:g} s waiting for greeting"
        )
        assert_worker_unharmed(postbode, store)


# -- odd MX records --------------------------------------------------------------------------


def test_mx_that_is_an_ip_literal_is_used(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback() as sink:
        dns_server.add_mx("dest.test", [(10, sink.host)])  # "MX 10 127.x.y.z." (RFC-wrong)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        (received,) = sink.wait_for_sync(1, timeout=15)
        row = wait_status(store, "alice@dest.test", "delivered")
    attempt = only_attempt(store, row["id"])
    assert (attempt["mx_host"], attempt["ip"]) == (sink.host, sink.host)
    assert dns_server.query_count(sink.host) == 0, "an address is not looked up"
    assert received.rcpt_tos == ("alice@dest.test",)


def test_mx_that_is_a_cname_is_followed(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback() as sink:
        dns_server.add_mx("dest.test", [(10, "mail.dest.test")])
        dns_server.add_cname("mail.dest.test", "mx.hoster.test")  # RFC 2181 §10.3 says don't
        dns_server.add_a("mx.hoster.test", sink.host)
        postbode = start_postbode()
        submit(postbode, shop, message("alice@dest.test"))
        sink.wait_for_sync(1, timeout=15)
        row = wait_status(store, "alice@dest.test", "delivered")
    attempt = only_attempt(store, row["id"])
    assert (attempt["mx_host"], attempt["ip"]) == ("mail.dest.test", sink.host)


# -- internationalised domains -------------------------------------------------------------------


def test_idn_domain_goes_out_as_punycode_without_smtputf8(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback(smtputf8=True) as sink:
        mx(dns_server, IDN_A_LABEL, sink.host)  # DNS holds the A-label
        postbode = start_postbode()
        # The header gives the address in ASCII, so the content needs no SMTPUTF8 of its own.
        submit(postbode, shop, message(f"anna@{IDN_A_LABEL}"), to=[f"anna@{IDN_DOMAIN}"])
        (received,) = sink.wait_for_sync(1, timeout=15)
        wait_status(store, f"anna@{IDN_DOMAIN}", "delivered")
    assert received.rcpt_tos == (f"anna@{IDN_A_LABEL}",)
    assert "SMTPUTF8" not in received.mail_options, "an ASCII envelope needs no SMTPUTF8"
    assert sink.replies(Stage.RCPT, f"anna@{IDN_A_LABEL}") == ["250 2.1.5 OK"]
    assert dns_server.query_count(IDN_A_LABEL, "MX") == 1


def test_utf8_local_part_uses_smtputf8_when_offered(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback(smtputf8=True) as sink:
        mx(dns_server, IDN_A_LABEL, sink.host)
        postbode = start_postbode()
        submit(postbode, shop, message(f"jürgen@{IDN_DOMAIN}"))
        (received,) = sink.wait_for_sync(1, timeout=15)
        wait_status(store, f"jürgen@{IDN_DOMAIN}", "delivered")
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == (f"jürgen@{IDN_A_LABEL}",)


def test_utf8_local_part_fails_hard_when_smtputf8_is_not_offered(
    start_postbode: StartPostbode, shop: tenancy.NewApp, dns_server: LoopbackDNS, store: Store
) -> None:
    with SmtpSink.on_random_loopback(smtputf8=False) as sink:
        mx(dns_server, IDN_A_LABEL, sink.host)
        postbode = start_postbode()
        submit(postbode, shop, message(f"jürgen@{IDN_DOMAIN}"))
        row = wait_status(store, f"jürgen@{IDN_DOMAIN}", "bounced")
        assert sink.replies(Stage.MAIL) == [], "nothing is sent that the server cannot take"
        assert row["attempts"] == 1
        assert_worker_unharmed(postbode, store)
    # Decided here, without a reply: the reason is all an operator has to go on.
    assert "SMTPUTF8" in (row["last_reply"] or ""), "the reason must be recorded in last_reply"
