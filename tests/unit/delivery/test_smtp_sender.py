"""Tests for the SMTP sender against real peers on 127.0.0.1: the scripted sink, and a raw
TCP peer for the garbage no real SMTP server library will produce."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import pytest

from postbode.delivery.outcomes import Delivered, HardFail, Reply, SoftFail
from postbode.delivery.smtp_sender import (
    SendResult,
    SmtpSession,
    SmtpTimeouts,
    TlsMode,
    parse_tls_policy,
    send_message,
    tls_mode_for,
)
from postbode.testing.sink import DROP, STALL, Rule, Script, SmtpSink, Stage

T = TypeVar("T")

FAST = SmtpTimeouts(connect=2.0, command=2.0, data_termination=2.0)
SHORT = SmtpTimeouts(connect=0.5, command=0.5, data_termination=0.5)
HELO = "mta.shop.test"
SENDER = "bounce+abc@return.shop.test"
MESSAGE = (
    b"From: Shop <orders@shop.test>\r\n"
    b"To: Alice <alice@dest.test>\r\n"
    b"Subject: Your order\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".a line that starts with a dot (RFC 5321 4.5.2)\r\n"
    b"SECRET-BODY-MARKER\r\n"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def send(
    sink: SmtpSink,
    rcpts: Sequence[str],
    message: bytes = MESSAGE,
    *,
    mail_from: str = SENDER,
    tls_mode: TlsMode = "opportunistic",
    timeouts: SmtpTimeouts = FAST,
    target_host: str = "sink.test",
    tls_context: ssl.SSLContext | None = None,
) -> SendResult:
    return run(
        send_message(
            target_host,
            sink.host,
            sink.port,
            HELO,
            tls_mode,
            timeouts,
            mail_from,
            rcpts,
            message,
            tls_context=tls_context,
        )
    )


def lines(result: SendResult, direction: str | None = None) -> list[str]:
    return [
        line.text
        for line in result.attempt.transcript
        if direction is None or line.direction == direction
    ]


# -- a raw TCP peer, for replies no SMTP library sends ------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawPeer:
    """A bare asyncio TCP server on 127.0.0.1 running `handler` for each connection."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.port = 0

    async def __aenter__(self) -> RawPeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._tasks.discard(task)


async def expect(reader: asyncio.StreamReader, prefix: bytes) -> bytes:
    line = await reader.readline()
    assert line.upper().startswith(prefix), line
    return line


async def plain_smtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal well-behaved SMTP server: accepts one message, then QUIT."""
    writer.write(b"220 raw.test ESMTP\r\n")
    await expect(reader, b"EHLO")
    writer.write(b"250 raw.test\r\n")
    while True:
        line = await reader.readline()
        if not line or line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            return
        if line.upper().startswith(b"DATA"):
            writer.write(b"354 go on\r\n")
            while (await reader.readline()) not in (b".\r\n", b""):
                pass
            writer.write(b"250 2.0.0 accepted\r\n")
        else:
            writer.write(b"250 OK\r\n")


async def raw_send(
    peer: RawPeer,
    rcpts: Sequence[str] = ("alice@dest.test",),
    tls_mode: TlsMode = "opportunistic",
    timeouts: SmtpTimeouts = SHORT,
) -> SendResult:
    return await send_message(
        "raw.test", "127.0.0.1", peer.port, HELO, tls_mode, timeouts, SENDER, rcpts, MESSAGE
    )


# -- delivered ----------------------------------------------------------------------------------


def test_delivered_with_transcript_and_attempt() -> None:
    with SmtpSink() as sink:
        result = send(sink, ["alice@dest.test"])
        [received] = sink.messages
        address = sink.address

    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, Delivered)
    assert outcome.reply.code == 250
    assert outcome.reply.enhanced_status == "2.0.0"
    assert received.data == MESSAGE  # dot-stuffing undone by the server, byte for byte
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ("alice@dest.test",)
    assert received.ehlo == HELO

    attempt = result.attempt
    assert (attempt.mx_host, (attempt.ip, attempt.port)) == ("sink.test", address)
    assert attempt.final_reply == outcome.reply
    assert attempt.tls_version is None and attempt.tls_cipher is None
    assert attempt.duration > 0
    assert result.session_error is None
    assert result.message_sent

    client = lines(result, "C")
    assert client == [
        f"EHLO {HELO}",
        f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}",
        "RCPT TO:<alice@dest.test>",
        "DATA",
        f"<message body, {len(MESSAGE)} bytes>",
    ]
    server = lines(result, "S")
    assert server[0].startswith("220 ")
    assert "250-8BITMIME" in server
    assert server[-2].startswith("354")
    assert server[-1] == str(outcome.reply)
    text = attempt.transcript_text()
    assert "SECRET-BODY-MARKER" not in text
    assert "Subject: Your order" not in text
    times = [line.at for line in attempt.transcript]
    assert times == sorted(times) and times[0] >= 0


def test_null_sender_for_bounces() -> None:
    with SmtpSink() as sink:
        result = send(sink, ["alice@dest.test"], mail_from="")
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.mail_from == "<>"
    assert "MAIL FROM:<> SIZE=" in lines(result, "C")[1]


def test_eight_bit_body_is_declared() -> None:
    message = MESSAGE.replace(b"Hello Alice", "Grüße, Alice".encode())
    with SmtpSink() as sink:
        result = send(sink, ["alice@dest.test"], message)
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert "BODY=8BITMIME" in received.mail_options  # RFC 6152
    assert received.data == message


def test_bare_line_feeds_are_sent_as_crlf() -> None:
    with SmtpSink() as sink:
        result = send(sink, ["alice@dest.test"], b"Subject: lf\n\nline one\nline two")
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.data == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


# -- rejected and deferred ------------------------------------------------------------------


def test_550_is_a_hard_fail_keeping_the_full_reply() -> None:
    reply = "550-5.1.1 The account does not exist.\n550 5.1.1 Check the address."
    with SmtpSink(script=Script(Rule.rcpt("nobody@dest.test", reply))) as sink:
        result = send(sink, ["nobody@dest.test"])
        assert sink.messages == []
    outcome = result.outcomes["nobody@dest.test"]
    assert isinstance(outcome, HardFail)
    assert outcome.reply == Reply(550, "5.1.1", "The account does not exist.\nCheck the address.")
    assert (outcome.reason, outcome.stage) == ("RCPT TO rejected", "rcpt")
    assert "550-5.1.1 The account does not exist." in lines(result, "S")
    assert "DATA" not in lines(result, "C")  # no accepted recipient, no DATA


def test_451_is_a_soft_fail_with_the_retry_hint() -> None:
    script = Script(Rule.rcpt(None, "451 4.7.1 Greylisted, please try again in 5 minutes"))
    with SmtpSink(script=script) as sink:
        result = send(sink, ["alice@dest.test"])
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reply is not None and outcome.reply.code == 451
    assert str(outcome.reply) == "451 4.7.1 Greylisted, please try again in 5 minutes"
    assert outcome.retry_after == 300.0
    assert outcome.stage == "rcpt"
    assert result.session_error is None


def test_mixed_recipients_get_their_own_outcomes() -> None:
    script = Script(
        Rule.rcpt("gone@dest.test", "550 5.1.1 No such user"),
        Rule.rcpt("full@dest.test", "452 4.2.2 Mailbox full"),
    )
    rcpts = ["alice@dest.test", "gone@dest.test", "full@dest.test", "bob@dest.test"]
    with SmtpSink(script=script) as sink:
        result = send(sink, rcpts)
        [received] = sink.messages
    assert list(result.outcomes) == rcpts
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert isinstance(result.outcomes["bob@dest.test"], Delivered)
    gone = result.outcomes["gone@dest.test"]
    assert isinstance(gone, HardFail) and gone.reply is not None and gone.reply.code == 550
    full = result.outcomes["full@dest.test"]
    assert isinstance(full, SoftFail) and full.reply is not None and full.reply.code == 452
    assert received.rcpt_tos == ("alice@dest.test", "bob@dest.test")


def test_duplicate_recipients_are_sent_once() -> None:
    with SmtpSink() as sink:
        result = send(sink, ["alice@dest.test", "alice@dest.test"])
        [received] = sink.messages
    assert list(result.outcomes) == ["alice@dest.test"]
    assert received.rcpt_tos == ("alice@dest.test",)


def test_rejected_sender_fails_every_recipient() -> None:
    with SmtpSink(script=Script(Rule.mail("553 5.7.1 Sender rejected"))) as sink:
        result = send(sink, ["a@dest.test", "b@dest.test"])
    for outcome in result.outcomes.values():
        assert isinstance(outcome, HardFail)
        assert (outcome.reason, outcome.stage) == ("MAIL FROM rejected", "mail")


def test_rejected_message_after_data() -> None:
    script = Script(Rule.data("554 5.7.1 Message looks like spam"))
    with SmtpSink(script=script) as sink:
        result = send(sink, ["alice@dest.test", "bob@dest.test"])
    for outcome in result.outcomes.values():
        assert isinstance(outcome, HardFail)
        assert outcome.reply is not None and outcome.reply.enhanced_status == "5.7.1"
        assert outcome.stage == "data"  # the end of data (RFC 5321 §4.1.1.4)
    assert result.attempt.final_reply is not None
    assert result.attempt.final_reply.code == 554


def test_greeting_554_is_a_hard_fail() -> None:
    with SmtpSink(script=Script(Rule.connect("554 5.7.1 You are not welcome"))) as sink:
        result = send(sink, ["a@dest.test", "b@dest.test"])
    for outcome in result.outcomes.values():
        assert isinstance(outcome, HardFail)
        assert outcome.reply is not None and outcome.reply.code == 554
        assert outcome.stage == "connect"
    assert result.session_error == "greeting rejected"


def test_greeting_421_is_a_soft_fail() -> None:
    with SmtpSink(script=Script(Rule.connect("421 4.3.2 Try again in 10 minutes"))) as sink:
        result = send(sink, ["a@dest.test"])
    outcome = result.outcomes["a@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.retry_after == 600.0
    assert result.session_error is not None


def test_421_mid_transaction_defers_everyone_undecided() -> None:
    script = Script(
        Rule.rcpt("gone@dest.test", "550 5.1.1 No such user"),
        Rule.rcpt("b@dest.test", "421 4.7.0 Too many errors, closing"),
    )
    with SmtpSink(script=script) as sink:
        result = send(sink, ["a@dest.test", "gone@dest.test", "b@dest.test", "c@dest.test"])
        assert sink.messages == []
    assert isinstance(result.outcomes["gone@dest.test"], HardFail)
    for rcpt in ("a@dest.test", "b@dest.test", "c@dest.test"):
        outcome = result.outcomes[rcpt]
        assert isinstance(outcome, SoftFail)
        assert outcome.reply is not None and outcome.reply.code == 421
    assert result.session_error is not None
    assert not result.message_sent  # safe to try the next MX
    assert result.attempt.final_reply is not None and result.attempt.final_reply.code == 421


def test_ehlo_refused_falls_back_to_helo() -> None:
    script = Script(Rule.ehlo("502 5.5.2 Command not recognized", "250 sink.test"))
    with SmtpSink(script=script) as sink:
        result = send(sink, ["alice@dest.test"])
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert lines(result, "C")[:2] == [f"EHLO {HELO}", f"HELO {HELO}"]
    assert "SIZE=" not in lines(result, "C")[2]  # no extensions after HELO
    assert received.ehlo == HELO


def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    result = run(
        send_message(
            "mx.dest.test", "127.0.0.1", port, HELO, "none", FAST, SENDER, ["a@b.test"], b""
        )
    )
    outcome = result.outcomes["a@b.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "connection refused"
    assert outcome.reply is None and outcome.retry_after is None
    assert result.attempt.final_reply is None
    assert result.session_error == "connection refused"


# -- one connection, several messages ------------------------------------------------------------


def test_two_messages_share_one_connection() -> None:
    async def scenario(sink: SmtpSink) -> tuple[SendResult, SendResult]:
        async with SmtpSession("sink.test", sink.host, sink.port, HELO, "none", FAST) as session:
            first = await session.send(SENDER, ["alice@dest.test"], MESSAGE)
            second = await session.send(SENDER, ["bob@dest.test"], MESSAGE)
        return first, second

    with SmtpSink() as sink:
        first, second = run(scenario(sink))
        assert sink.connections == 1
        assert [m.connection for m in sink.messages] == [1, 1]
        assert [m.rcpt_tos for m in sink.messages] == [("alice@dest.test",), ("bob@dest.test",)]
    assert isinstance(first.outcomes["alice@dest.test"], Delivered)
    assert isinstance(second.outcomes["bob@dest.test"], Delivered)
    assert "RSET" not in lines(first, "C")
    # The first transaction ended with its reply to ".", so the next needs no RSET; the
    # set-up is repeated for context.
    assert lines(second, "C") == [
        f"EHLO {HELO}",
        f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}",
        "RCPT TO:<bob@dest.test>",
        "DATA",
        f"<message body, {len(MESSAGE)} bytes>",
    ]
    assert second.attempt.started_at >= first.attempt.started_at


def test_connection_is_reused_after_a_rejected_message() -> None:
    async def scenario(sink: SmtpSink) -> list[SendResult]:
        async with SmtpSession("sink.test", sink.host, sink.port, HELO, "none", FAST) as session:
            return [
                await session.send(SENDER, ["gone@dest.test"], MESSAGE),
                await session.send(SENDER, ["alice@dest.test"], MESSAGE),
            ]

    with SmtpSink(script=Script(Rule.rcpt("gone@dest.test", "550 5.1.1 No"))) as sink:
        rejected, delivered = run(scenario(sink))
        assert sink.connections == 1
    assert isinstance(rejected.outcomes["gone@dest.test"], HardFail)
    assert isinstance(delivered.outcomes["alice@dest.test"], Delivered)
    # RFC 5321 §4.1.1.5: the refused transaction was left open, so RSET clears it first
    assert lines(delivered, "C")[1:3] == ["RSET", f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}"]


# -- pipelining (RFC 2920) ----------------------------------------------------------------------


def test_pipelining_sends_the_envelope_in_one_group() -> None:
    async def scenario(sink: SmtpSink) -> list[SendResult]:
        async with SmtpSession("sink.test", sink.host, sink.port, HELO, "none", FAST) as session:
            return [
                await session.send(SENDER, ["alice@dest.test", "gone@dest.test"], MESSAGE),
                await session.send(SENDER, ["bob@dest.test"], MESSAGE),
            ]

    script = Script(Rule.rcpt("gone@dest.test", "550 5.1.1 No such user"))
    with SmtpSink(script=script, pipelining=True) as sink:
        first, second = run(scenario(sink))
        assert sink.connections == 1
        assert [m.rcpt_tos for m in sink.messages] == [("alice@dest.test",), ("bob@dest.test",)]
    assert isinstance(first.outcomes["alice@dest.test"], Delivered)
    refused = first.outcomes["gone@dest.test"]
    assert isinstance(refused, HardFail) and refused.reply is not None
    assert refused.reply.code == 550
    assert isinstance(second.outcomes["bob@dest.test"], Delivered)
    # the commands went before any reply to them came back, as the transcript shows
    wire = [f"{line.direction}: {line.text}" for line in first.attempt.transcript]
    group = wire.index(f"C: MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}")
    assert wire[group + 1 : group + 3] == [
        "C: RCPT TO:<alice@dest.test>",
        "C: RCPT TO:<gone@dest.test>",
    ]
    assert wire[group + 3] == "C: DATA" and wire[group + 4].startswith("S: 250")
    assert "RSET" not in lines(second, "C")


def test_pipelined_data_accepted_without_recipients_sends_an_empty_message() -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250-raw.test\r\n250 PIPELINING\r\n")
        for prefix in (b"MAIL", b"RCPT", b"DATA"):
            await expect(reader, prefix)
        # all three replies in one segment; a lax server says 354 to DATA regardless
        writer.write(b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n354 Go ahead\r\n")
        assert await reader.readline() == b".\r\n"  # RFC 2920 §3.1: nothing but the end
        writer.write(b"554 5.5.1 No valid recipients\r\n")
        # that ended the transaction: the next one starts without RSET, in step
        for prefix in (b"MAIL", b"RCPT", b"DATA"):
            await expect(reader, prefix)
        writer.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 Go ahead\r\n")
        while await reader.readline() != b".\r\n":
            pass
        writer.write(b"250 2.0.0 Queued\r\n")
        await expect(reader, b"QUIT")
        writer.write(b"221 2.0.0 Bye\r\n")

    async def scenario() -> list[SendResult]:
        async with (
            RawPeer(peer) as raw,
            SmtpSession("raw.test", "127.0.0.1", raw.port, HELO, "none", FAST) as session,
        ):
            return [
                await session.send(SENDER, ["gone@dest.test"], MESSAGE),
                await session.send(SENDER, ["alice@dest.test"], MESSAGE),
            ]

    result, after = run(scenario())
    assert isinstance(after.outcomes["alice@dest.test"], Delivered)
    assert after.attempt.final_reply is not None and after.attempt.final_reply.code == 250
    outcome = result.outcomes["gone@dest.test"]
    assert isinstance(outcome, HardFail) and outcome.reply is not None
    assert outcome.reply.code == 550
    assert not result.message_sent


def test_a_broken_session_fails_later_messages_without_raising() -> None:
    async def scenario(sink: SmtpSink) -> list[SendResult]:
        async with SmtpSession("sink.test", sink.host, sink.port, HELO, "none", FAST) as session:
            return [
                await session.send(SENDER, ["cut@dest.test"], MESSAGE),
                await session.send(SENDER, ["alice@dest.test"], MESSAGE),
            ]

    with SmtpSink(script=Script(Rule.data(DROP))) as sink:
        dropped, after = run(scenario(sink))
    assert isinstance(dropped.outcomes["cut@dest.test"], SoftFail)
    later = after.outcomes["alice@dest.test"]
    assert isinstance(later, SoftFail)
    assert after.session_error is not None


# -- the connection breaks -----------------------------------------------------------------------


def test_drop_mid_data_is_a_soft_fail() -> None:
    with SmtpSink(script=Script(Rule.data(DROP))) as sink:
        result = send(sink, ["alice@dest.test", "bob@dest.test"])
        assert sink.messages == []
    for outcome in result.outcomes.values():
        assert isinstance(outcome, SoftFail)
        assert outcome.reply is None
        assert "connection lost" in outcome.reason
    assert result.session_error is not None
    assert result.message_sent  # the remote may have it: another MX risks a duplicate
    assert result.attempt.final_reply is None
    assert lines(result, "C")[-1] == f"<message body, {len(MESSAGE)} bytes>"


def test_stall_after_data_times_out() -> None:
    with SmtpSink(script=Script(Rule.data(STALL))) as sink:
        result = send(sink, ["alice@dest.test"], timeouts=SHORT)
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "timed out after 0.5 s waiting for reply to end of data"
    assert result.attempt.duration >= 0.5


def test_stall_at_rcpt_times_out() -> None:
    with SmtpSink(script=Script(Rule.rcpt("slow@dest.test", STALL))) as sink:
        result = send(sink, ["alice@dest.test", "slow@dest.test"], timeouts=SHORT)
    for outcome in result.outcomes.values():
        assert isinstance(outcome, SoftFail)
        assert "timed out" in outcome.reason


def test_greeting_that_never_comes_times_out() -> None:
    with SmtpSink(script=Script(Rule.connect(STALL))) as sink:
        result = send(sink, ["alice@dest.test"], timeouts=SHORT)
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "timed out after 0.5 s waiting for greeting"


# -- STARTTLS -----------------------------------------------------------------------------------


def test_starttls_required_but_not_offered() -> None:
    with SmtpSink(tls=False) as sink:
        result = send(sink, ["alice@dest.test"], tls_mode="require")
        assert sink.messages == []
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "STARTTLS required but not offered"
    assert "MAIL" not in " ".join(lines(result, "C"))


def test_opportunistic_starttls_records_tls_version() -> None:
    with SmtpSink(tls=True) as sink:
        result = send(sink, ["alice@dest.test"], tls_mode="opportunistic")
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.tls
    assert result.attempt.tls_version is not None
    assert result.attempt.tls_version.startswith("TLSv1.")
    assert result.attempt.tls_version == received.tls_version
    assert result.attempt.tls_cipher
    client = lines(result, "C")
    # RFC 3207 §4.2: EHLO again after the handshake.
    assert client[:3] == [f"EHLO {HELO}", "STARTTLS", f"EHLO {HELO}"]


def test_require_mode_uses_offered_starttls() -> None:
    with SmtpSink(tls=True) as sink:
        result = send(sink, ["alice@dest.test"], tls_mode="require")
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.tls


def test_none_mode_never_starts_tls() -> None:
    with SmtpSink(tls=True) as sink:
        result = send(sink, ["alice@dest.test"], tls_mode="none")
        [received] = sink.messages
    assert not received.tls
    assert result.attempt.tls_version is None


def test_verify_mode_accepts_a_trusted_certificate_for_the_mx_name() -> None:
    with SmtpSink(tls=True, hostname="mx.dest.test") as sink:
        assert sink.tls_cert_pem is not None
        trust = ssl.create_default_context(cadata=sink.tls_cert_pem.decode())
        result = send(
            sink,
            ["alice@dest.test"],
            tls_mode="verify",
            target_host="mx.dest.test",
            tls_context=trust,
        )
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.tls


def test_verify_mode_accepts_an_mx_name_with_a_root_dot() -> None:
    with SmtpSink(tls=True, hostname="mx.dest.test") as sink:
        assert sink.tls_cert_pem is not None
        trust = ssl.create_default_context(cadata=sink.tls_cert_pem.decode())
        result = send(
            sink,
            ["alice@dest.test"],
            tls_mode="verify",
            target_host="mx.dest.test.",
            tls_context=trust,
        )
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)


def test_verify_mode_refuses_a_certificate_for_another_name() -> None:
    with SmtpSink(tls=True, hostname="mx.dest.test") as sink:
        assert sink.tls_cert_pem is not None
        trust = ssl.create_default_context(cadata=sink.tls_cert_pem.decode())
        result = send(
            sink,
            ["alice@dest.test"],
            tls_mode="verify",
            target_host="mx.other.test",
            tls_context=trust,
        )
        assert sink.messages == []
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason.startswith("TLS certificate verification failed")


def test_verify_mode_refuses_an_untrusted_certificate() -> None:
    with SmtpSink(tls=True, hostname="mx.dest.test") as sink:
        result = send(sink, ["alice@dest.test"], tls_mode="verify", target_host="mx.dest.test")
        assert sink.messages == []
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason.startswith("TLS certificate verification failed")


def test_opportunistic_tls_failure_retries_in_plain_text() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            writer.write(b"220 raw.test ESMTP\r\n")
            await expect(reader, b"EHLO")
            writer.write(b"250-raw.test\r\n250 STARTTLS\r\n")
            await expect(reader, b"STARTTLS")
            writer.write(b"220 go ahead\r\n")
            await reader.read(1)  # the ClientHello has begun: answer it with nonsense
            writer.write(b"this is not a TLS handshake\r\n")
            await reader.read()  # until the client gives up on us
        else:
            await plain_smtp(reader, writer)

    async def scenario() -> tuple[SendResult, int]:
        async with RawPeer(handler) as peer:
            result = await raw_send(peer, tls_mode="opportunistic", timeouts=FAST)
            return result, peer.connections

    result, connections = run(scenario())
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert connections == 2
    assert result.attempt.tls_version is None
    notes = lines(result, "*")
    assert any(n.startswith("TLS negotiation failed") for n in notes)
    assert "retrying without TLS on a new connection" in notes


def test_required_tls_failure_is_a_soft_fail() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250-raw.test\r\n250 STARTTLS\r\n")
        await expect(reader, b"STARTTLS")
        writer.write(b"220 go ahead\r\n")
        await reader.read(1)
        writer.write(b"this is not a TLS handshake\r\n")
        await reader.read()

    async def scenario() -> tuple[SendResult, int]:
        async with RawPeer(handler) as peer:
            return await raw_send(peer, tls_mode="require", timeouts=FAST), peer.connections

    result, connections = run(scenario())
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason.startswith("TLS negotiation failed")
    assert connections == 1


def test_refused_starttls_continues_in_plain_text_when_opportunistic() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250-raw.test\r\n250 STARTTLS\r\n")
        await expect(reader, b"STARTTLS")
        writer.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
        await plain_smtp_after_ehlo(reader, writer)

    async def scenario() -> tuple[SendResult, int]:
        async with RawPeer(handler) as peer:
            return await raw_send(peer, timeouts=FAST), peer.connections

    result, connections = run(scenario())
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert connections == 1
    assert "454 4.7.0 TLS not available due to temporary reason" in lines(result, "S")


async def plain_smtp_after_ehlo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readline()
        if not line or line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            return
        if line.upper().startswith(b"DATA"):
            writer.write(b"354 go on\r\n")
            while (await reader.readline()) not in (b".\r\n", b""):
                pass
            writer.write(b"250 2.0.0 accepted\r\n")
        else:
            writer.write(b"250 OK\r\n")


# -- garbage from the peer ------------------------------------------------------------------


def _raw_result(handler: Handler, timeouts: SmtpTimeouts = SHORT) -> SendResult:
    async def scenario() -> SendResult:
        async with RawPeer(handler) as peer:
            return await raw_send(peer, timeouts=timeouts)

    return run(scenario())


def test_malformed_greeting_is_a_soft_fail() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"hello, I am not an SMTP server\r\n")
        await reader.read()

    result = _raw_result(handler)
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason.startswith("malformed greeting: ")


def test_malformed_reply_mid_session_is_a_soft_fail() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250 raw.test\r\n")
        await expect(reader, b"MAIL")
        writer.write(b"250 OK\r\n")
        await expect(reader, b"RCPT")
        writer.write(b"2x0 what?\r\n")
        await reader.read()

    outcome = _raw_result(handler).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason.startswith("malformed reply to RCPT TO: ")


def test_reply_code_out_of_range_is_a_soft_fail() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"999 raw.test\r\n")
        await reader.read()

    outcome = _raw_result(handler).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert "malformed" in outcome.reason


def test_unexpected_reply_class_is_a_soft_fail() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250 raw.test\r\n")
        await expect(reader, b"MAIL")
        writer.write(b"250 OK\r\n")
        await expect(reader, b"RCPT")
        writer.write(b"250 OK\r\n")
        await expect(reader, b"DATA")
        writer.write(b"250 I do not want your data\r\n")
        await reader.read()

    outcome = _raw_result(handler).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "unexpected reply to DATA"


def test_endless_reply_line_is_cut_off() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 ")
        while True:  # never a line end: the client must stop reading at its cap
            writer.write(b"x" * 4096)
            await writer.drain()

    outcome = _raw_result(handler, FAST).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert "too long" in outcome.reason


def test_endless_multi_line_reply_is_cut_off() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test\r\n")
        await expect(reader, b"EHLO")
        while True:
            writer.write(b"250-still going\r\n" * 256)
            await writer.drain()

    outcome = _raw_result(handler, FAST).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert "too long" in outcome.reason


def test_reply_line_that_never_ends_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(b"220 raw.test\r\n")
        await expect(reader, b"EHLO")
        writer.write(b"250 half a line")
        await reader.read()

    outcome = _raw_result(handler).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "timed out after 0.5 s waiting for reply to EHLO"


def test_peer_closing_right_after_connect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        return

    outcome = _raw_result(handler).outcomes["alice@dest.test"]
    assert isinstance(outcome, SoftFail)
    assert outcome.reason == "connection lost waiting for greeting"


# -- addresses: SMTPUTF8, IDNA, size --------------------------------------------------------


def test_smtputf8_used_when_needed_and_offered() -> None:
    with SmtpSink(smtputf8=True) as sink:
        result = send(sink, ["jörg@dest.test"])
        [received] = sink.messages
    assert isinstance(result.outcomes["jörg@dest.test"], Delivered)
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ("jörg@dest.test",)


def test_smtputf8_not_used_for_ascii_envelopes() -> None:
    with SmtpSink(smtputf8=True) as sink:
        send(sink, ["alice@dest.test"])
        [received] = sink.messages
    assert "SMTPUTF8" not in received.mail_options


def test_smtputf8_needed_but_not_offered_is_a_hard_fail() -> None:
    with SmtpSink(smtputf8=False) as sink:
        result = send(sink, ["jörg@dest.test", "alice@dest.test"])
        [received] = sink.messages
    outcome = result.outcomes["jörg@dest.test"]
    assert isinstance(outcome, HardFail)
    assert outcome.reply is None
    assert "SMTPUTF8" in outcome.reason and "not offered" in outcome.reason
    assert isinstance(result.outcomes["alice@dest.test"], Delivered)
    assert received.rcpt_tos == ("alice@dest.test",)


def test_smtputf8_sender_not_offered_fails_everyone() -> None:
    with SmtpSink(smtputf8=False) as sink:
        result = send(sink, ["alice@dest.test"], mail_from="jörg@shop.test")
        assert sink.messages == []
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, HardFail)
    assert "SMTPUTF8" in outcome.reason


def test_internationalised_domains_are_idna_encoded() -> None:
    with SmtpSink(smtputf8=False) as sink:
        result = send(sink, ["alice@bücher.test"], mail_from="shop@bücher-shop.test")
        [received] = sink.messages
    assert isinstance(result.outcomes["alice@bücher.test"], Delivered)
    assert received.rcpt_tos == ("alice@xn--bcher-kva.test",)
    assert received.mail_from == "shop@xn--bcher-shop-9db.test"


@pytest.mark.parametrize(
    "bad", ["no-at-sign", "a@", "@dest.test", "evil@dest.test>\r\nRSET", "a@b\x00.test"]
)
def test_invalid_recipients_are_hard_fails_and_never_sent(bad: str) -> None:
    with SmtpSink() as sink:
        result = send(sink, [bad, "alice@dest.test"])
        [received] = sink.messages
    outcome = result.outcomes[bad]
    assert isinstance(outcome, HardFail)
    assert outcome.reason.startswith("invalid recipient")
    assert received.rcpt_tos == ("alice@dest.test",)


def test_message_over_the_advertised_size_is_a_hard_fail() -> None:
    with SmtpSink(data_size_limit=64) as sink:
        result = send(sink, ["alice@dest.test"])
        assert sink.messages == []
    outcome = result.outcomes["alice@dest.test"]
    assert isinstance(outcome, HardFail)
    assert "RFC 1870" in outcome.reason
    assert "MAIL" not in " ".join(lines(result, "C"))


def test_no_recipients_means_no_transaction() -> None:
    with SmtpSink() as sink:
        result = send(sink, [])
        assert sink.messages == []
    assert result.outcomes == {}
    assert "MAIL" not in " ".join(lines(result, "C"))


def test_unknown_tls_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        SmtpSession("mx.dest.test", "127.0.0.1", 25, HELO, "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("helo", ["", "two words", "evil\r\nRSET", "<x>"])
def test_invalid_helo_name_is_a_programming_error(helo: str) -> None:
    with pytest.raises(ValueError):
        SmtpSession("mx.dest.test", "127.0.0.1", 25, helo)


def test_internationalised_helo_name_is_idna_encoded() -> None:
    session = SmtpSession("mx.dest.test", "127.0.0.1", 25, "mta.bücher.test")
    assert session.helo_name == "mta.xn--bcher-kva.test"


def test_cancelled_send_closes_the_connection_cleanly() -> None:
    async def scenario(sink: SmtpSink) -> None:
        async with SmtpSession("sink.test", sink.host, sink.port, HELO, "none", FAST) as session:
            await asyncio.wait_for(session.send(SENDER, ["alice@dest.test"], MESSAGE), 0.2)

    with SmtpSink(script=Script(Rule.data(STALL))) as sink:
        # The caller's own deadline cancels the send; the session must not leak its socket
        # (filterwarnings = error turns a ResourceWarning into a failure).
        with pytest.raises(TimeoutError):
            run(scenario(sink))
        gc.collect()  # an unclosed socket would warn now, inside this test


def test_timeouts_from_settings() -> None:
    from postbode.config import Settings

    settings = Settings(smtp_connect_timeout=1.5, smtp_command_timeout=2.5, smtp_data_timeout=3.5)
    assert SmtpTimeouts.from_settings(settings) == SmtpTimeouts(1.5, 2.5, 3.5)


def test_sink_saw_what_the_transcript_says() -> None:
    script = Script(Rule.rcpt("gone@dest.test", "550 5.1.1 No such user"))
    with SmtpSink(script=script) as sink:
        result = send(sink, ["alice@dest.test", "gone@dest.test"])
        sink_rcpt_replies = sink.replies(Stage.RCPT)
    transcript_rcpt_replies = [
        s for s in lines(result, "S") if s.startswith(("250 2.1.5", "550 5.1.1"))
    ]
    assert transcript_rcpt_replies == sink_rcpt_replies


# -- TLS policy (settings.tls_policy) ---------------------------------------------------------


def test_tls_policy_lookup() -> None:
    policy = parse_tls_policy(
        "secure.test=verify, *.bank.test=require\n*.eu.bank.test=verify,plain.test=none"
    )
    assert tls_mode_for(policy, "secure.test") == "verify"
    assert tls_mode_for(policy, "SECURE.test.") == "verify"
    assert tls_mode_for(policy, "sub.secure.test") == "opportunistic"  # exact means exact
    assert tls_mode_for(policy, "mail.bank.test") == "require"
    assert tls_mode_for(policy, "x.eu.bank.test") == "verify"  # the longest suffix wins
    assert tls_mode_for(policy, "bank.test") == "opportunistic"  # *. is subdomains only
    assert tls_mode_for(policy, "plain.test") == "none"
    assert tls_mode_for(policy, "other.test") == "opportunistic"
    assert tls_mode_for(policy, "other.test", default="require") == "require"
    assert tls_mode_for(parse_tls_policy("*=require"), "any.test") == "require"
    assert parse_tls_policy("") == {}


def test_tls_policy_internationalised_domains() -> None:
    policy = parse_tls_policy("bücher.test=verify")
    assert policy == {"xn--bcher-kva.test": "verify"}
    assert tls_mode_for(policy, "bücher.test") == "verify"
    assert tls_mode_for(policy, "xn--bcher-kva.test") == "verify"


@pytest.mark.parametrize("bad", ["secure.test", "secure.test=maybe", "=verify", "bü..test=verify"])
def test_tls_policy_errors_name_the_entry(bad: str) -> None:
    with pytest.raises(ValueError, match="TLS policy entry"):
        parse_tls_policy(bad)


def test_data_payload_ends_lines_in_crlf_and_doubles_leading_dots() -> None:
    """RFC 5321 §2.3.8 and §4.5.2, checked against the two plain substitutions for random
    bytes made of line ends and dots (the payload skips a pass that would change nothing)."""
    import random
    import re

    from postbode.delivery.smtp_sender import _data_payload

    def reference(message: bytes) -> bytes:
        body = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        return re.sub(rb"(?m)^\.", b"..", body) + b".\r\n"

    assert _data_payload(b"a\n.b\r.c\r\n..d") == b"a\r\n..b\r\n..c\r\n...d\r\n.\r\n"
    assert _data_payload(b"Subject: x\r\n\r\nhi\r\n") == b"Subject: x\r\n\r\nhi\r\n.\r\n"
    rng = random.Random(5321)
    pieces = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b" "]
    for _ in range(3000):
        message = b"".join(rng.choices(pieces, k=rng.randint(0, 20)))
        assert _data_payload(message) == reference(message), message
