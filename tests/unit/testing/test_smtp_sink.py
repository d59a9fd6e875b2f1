"""The SMTP sink answers as scripted and records what real clients send it."""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import aiosmtplib
import pytest

from postbode.testing.sink import (
    DROP,
    STALL,
    Action,
    Rule,
    Script,
    SmtpSink,
    Stage,
    normalise_reply,
)

MESSAGE = b"From: a@shop.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def client(sink: SmtpSink, timeout: float = 5.0) -> smtplib.SMTP:
    # local_hostname: smtplib would otherwise ask socket.getfqdn(), i.e. maybe the network.
    return smtplib.SMTP(sink.host, sink.port, local_hostname="client.test", timeout=timeout)


def test_accepts_and_records_a_message(sink: SmtpSink) -> None:
    assert sink.port > 0
    with client(sink) as c:
        refused = c.sendmail("a@shop.test", ["b@dest.test", "c@dest.test"], MESSAGE)
    assert refused == {}
    [msg] = sink.wait_for_sync(1, timeout=5)
    assert msg.mail_from == "a@shop.test"
    assert msg.rcpt_tos == ("b@dest.test", "c@dest.test")
    assert msg.data == MESSAGE  # dot-unstuffed again (RFC 5321 §4.5.2)
    assert msg.peer[0] == "127.0.0.1"
    assert msg.ehlo == "client.test"
    assert not msg.tls and msg.tls_version is None
    assert msg.reply.startswith("250 2.0.0")
    assert msg.message["Subject"] == "hi"
    assert sink.connections == 1


def test_null_reverse_path_is_recorded(sink: SmtpSink) -> None:
    with client(sink) as c:
        c.sendmail("", ["b@dest.test"], MESSAGE)
    assert sink.wait_for_sync(1)[0].mail_from == "<>"


def test_rejects_one_recipient_and_delivers_to_the_others() -> None:
    script = Script(Rule.rcpt("bounce@dest.test", "550 5.1.1 No such user"))
    with SmtpSink(script=script) as sink, client(sink) as c:
        refused = c.sendmail("a@shop.test", ["ok@dest.test", "bounce@dest.test"], MESSAGE)
        assert refused == {"bounce@dest.test": (550, b"5.1.1 No such user")}
        assert sink.wait_for_sync(1)[0].rcpt_tos == ("ok@dest.test",)
        assert sink.replies(Stage.RCPT, "BOUNCE@dest.test") == ["550 5.1.1 No such user"]


def test_answers_a_sequence_across_attempts() -> None:
    script = Script(
        Rule.rcpt("later@dest.test", "451 4.3.0 Busy", "451 4.3.0 Still busy", "250 2.1.5 OK")
    )
    with SmtpSink(script=script) as sink:
        for expected in ("4.3.0 Busy", "4.3.0 Still busy"):
            with client(sink) as c, pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                c.sendmail("a@shop.test", ["later@dest.test"], MESSAGE)
            assert info.value.recipients == {"later@dest.test": (451, expected.encode())}
        with client(sink) as c:
            c.sendmail("a@shop.test", ["later@dest.test"], MESSAGE)
        with client(sink) as c:  # the last reply repeats
            c.sendmail("a@shop.test", ["later@dest.test"], MESSAGE)
        assert len(sink.wait_for_sync(2)) == 2
        assert sink.replies(Stage.RCPT, "later@dest.test") == [
            "451 4.3.0 Busy",
            "451 4.3.0 Still busy",
            "250 2.1.5 OK",
            "250 2.1.5 OK",
        ]
        assert sink.connections == 4


def test_multi_line_reply() -> None:
    script = Script(Rule.rcpt(None, "550 5.7.1 Rejected\nsee https://help.dest.test/550"))
    with SmtpSink(script=script) as sink, client(sink) as c:
        c.ehlo()
        c.mail("a@shop.test")
        code, text = c.rcpt("x@dest.test")
    assert code == 550
    assert text == b"5.7.1 Rejected\nsee https://help.dest.test/550"
    assert sink.replies(Stage.RCPT) == ["550-5.7.1 Rejected\r\n550 see https://help.dest.test/550"]


def test_rejects_mail_from_and_data() -> None:
    script = Script(
        Rule.mail("554 5.7.1 Sender blocked", match="spam@shop.test"),
        Rule.data("552 5.3.4 Message too big"),
    )
    with SmtpSink(script=script) as sink:
        with client(sink) as c, pytest.raises(smtplib.SMTPSenderRefused) as sender:
            c.sendmail("spam@shop.test", ["b@dest.test"], MESSAGE)
        assert sender.value.smtp_code == 554
        with client(sink) as c, pytest.raises(smtplib.SMTPDataError) as data:
            c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
        assert data.value.smtp_code == 552
        assert sink.messages == []
        assert sink.replies(Stage.DATA, "b@dest.test") == ["552 5.3.4 Message too big"]


def test_scripted_greeting_refuses_the_session() -> None:
    with SmtpSink(script=Script(Rule.connect("554 5.7.1 No service"))) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            client(sink)
        assert info.value.smtp_code == 554
        # RFC 5321 §3.1: after a 554 greeting only QUIT is served.
        with socket.create_connection(sink.address, timeout=5) as raw:
            stream = raw.makefile("rwb")
            assert stream.readline().startswith(b"554 ")
            stream.write(b"EHLO client.test\r\n")
            stream.flush()
            assert stream.readline().startswith(b"503 ")
            stream.write(b"QUIT\r\n")
            stream.flush()
            assert stream.readline().startswith(b"221 ")
            stream.close()


def test_scripted_421_greeting_closes_and_2xx_greeting_is_used() -> None:
    script = Script(Rule.connect("421 4.3.2 Shutting down", "220 mx.dest.test ESMTP ready"))
    with SmtpSink(script=script) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            client(sink)
        assert info.value.smtp_code == 421
        c = client(sink)
        try:
            assert c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE) == {}
        finally:
            c.quit()
        assert sink.replies(Stage.CONNECT) == [
            "421 4.3.2 Shutting down",
            "220 mx.dest.test ESMTP ready",
        ]


def test_scripted_ehlo_reply() -> None:
    script = Script(Rule.ehlo("250 mx.dest.test", match="plain.test"))
    with SmtpSink(script=script, tls=True) as sink:
        with client(sink) as c:
            c.ehlo("plain.test")
            assert not c.has_extn("starttls")  # the scripted reply replaced the extensions
        with client(sink) as c:
            c.ehlo("other.test")
            assert c.has_extn("starttls") and c.has_extn("8bitmime")
            assert not c.has_extn("auth")  # an MX offers no AUTH


def test_drop_mid_data_loses_the_reply_and_records_nothing() -> None:
    script = Script(Rule.data(DROP, match="cut@dest.test"))
    with SmtpSink(script=script) as sink:
        with client(sink) as c, pytest.raises(smtplib.SMTPServerDisconnected):
            c.sendmail("a@shop.test", ["cut@dest.test"], MESSAGE)
        assert sink.messages == []
        [exchange] = [e for e in sink.exchanges if e.stage is Stage.DATA]
        assert exchange.action is Action.DROP and exchange.reply is None
        # The sink still serves the next connection.
        with client(sink) as c:
            c.sendmail("a@shop.test", ["ok@dest.test"], MESSAGE)
        assert sink.wait_for_sync(1)[0].rcpt_tos == ("ok@dest.test",)


def test_drop_at_rcpt_and_at_connect() -> None:
    script = Script(Rule.rcpt("gone@dest.test", DROP), Rule.connect("220 ok", DROP))
    with SmtpSink(script=script) as sink:
        with client(sink) as c, pytest.raises(smtplib.SMTPServerDisconnected):
            c.sendmail("a@shop.test", ["gone@dest.test"], MESSAGE)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client(sink)


def test_stall_makes_the_client_time_out_and_stop_releases_it() -> None:
    async def scenario(sink: SmtpSink) -> None:
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            await aiosmtplib.send(
                MESSAGE,
                sender="a@shop.test",
                recipients=["slow@dest.test"],
                hostname=sink.host,
                port=sink.port,
                local_hostname="client.test",
                start_tls=False,
                timeout=0.3,
            )
        await sink.wait_until(lambda s: any(e.action is STALL for e in s.exchanges))

    with SmtpSink(script=Script(Rule.data(STALL, match="slow@dest.test"))) as sink:
        asyncio.run(scenario(sink))
        assert sink.messages == []
        # A stalled session whose client is still connected does not hold up stop().
        raw = socket.create_connection(sink.address, timeout=5)
        try:
            stream = raw.makefile("rwb")
            assert stream.readline().startswith(b"220 ")
            for line in (b"EHLO c.test", b"MAIL FROM:<a@shop.test>", b"RCPT TO:<slow@dest.test>"):
                stream.write(line + b"\r\n")
                stream.flush()
                while (reply := stream.readline())[3:4] == b"-":
                    pass
                assert reply.startswith(b"250")
            stream.write(b"DATA\r\n")
            stream.flush()
            assert stream.readline().startswith(b"354")
            stream.write(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            stream.flush()
            sink.wait_until_sync(
                lambda s: sum(e.action is STALL for e in s.exchanges) == 2, timeout=5
            )
            started = time.monotonic()
            sink.stop()
            assert time.monotonic() - started < 5
            assert stream.readline() == b""  # the sink cut the stalled connection
            stream.close()
        finally:
            raw.close()


def test_stall_at_connect_times_out_the_greeting() -> None:
    with SmtpSink(script=Script(Rule.connect(STALL))) as sink:
        with pytest.raises((TimeoutError, smtplib.SMTPServerDisconnected)):
            client(sink, timeout=0.3)
        sink.wait_until_sync(lambda s: s.replies(Stage.CONNECT) == [None])


def test_starttls_offered_with_a_verifiable_certificate() -> None:
    with SmtpSink(tls=True) as sink:
        assert sink.tls_cert_pem is not None and sink.tls_cert_file is not None
        assert sink.tls_cert_file.exists()
        context = ssl.create_default_context(cadata=sink.tls_cert_pem.decode())
        with client(sink) as c:
            c.ehlo()
            assert c.has_extn("starttls")
            c.starttls(context=context)  # verifies the chain and 127.0.0.1 in the SAN
            c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
        [msg] = sink.wait_for_sync(1)
        assert msg.tls and msg.tls_version is not None and msg.tls_version.startswith("TLS")
        cert_file = sink.tls_cert_file
    assert not cert_file.exists()  # the temporary directory went with the sink


def test_starttls_not_offered_by_default(sink: SmtpSink) -> None:
    assert sink.tls_cert_pem is None
    with client(sink) as c:
        c.ehlo()
        assert not c.has_extn("starttls")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            c.starttls()


def test_require_tls_refuses_mail_before_starttls() -> None:
    with SmtpSink(tls=True, require_tls=True) as sink, client(sink) as c:
        c.ehlo()
        code, _ = c.mail("a@shop.test")
        assert code == 530  # RFC 3207 §4


def test_async_use_and_live_script_changes() -> None:
    async def scenario() -> None:
        async with SmtpSink() as sink:
            await aiosmtplib.send(
                MESSAGE,
                sender="a@shop.test",
                recipients=["b@dest.test"],
                hostname=sink.host,
                port=sink.port,
                local_hostname="client.test",
                start_tls=False,
            )
            [msg] = await sink.wait_for(1, timeout=5)
            assert msg.rcpt_tos == ("b@dest.test",)
            sink.script.add(Rule.rcpt("b@dest.test", "452 4.2.2 Mailbox full"))
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await aiosmtplib.send(
                    MESSAGE,
                    sender="a@shop.test",
                    recipients=["b@dest.test"],
                    hostname=sink.host,
                    port=sink.port,
                    local_hostname="client.test",
                    start_tls=False,
                )
            with pytest.raises(TimeoutError, match="2 message"):
                await sink.wait_for(2, timeout=0.2)

    asyncio.run(scenario())


def test_wait_for_sync_times_out_with_what_it_saw(sink: SmtpSink) -> None:
    with client(sink) as c:
        c.ehlo()
    with pytest.raises(TimeoutError, match=r"no 1 message\(s\).*ehlo:client.test"):
        sink.wait_for_sync(1, timeout=0.2)


def test_clear_forgets_records(sink: SmtpSink) -> None:
    with client(sink) as c:
        c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
    sink.wait_for_sync(1)
    sink.clear()
    assert sink.messages == [] and sink.exchanges == []


def test_binds_a_given_loopback_address() -> None:
    with SmtpSink(host="127.0.0.3", port=0) as sink, client(sink) as c:
        c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
        assert sink.host == "127.0.0.3"
        assert sink.wait_for_sync(1)[0].peer[0] == "127.0.0.1"


@pytest.mark.skipif(os.geteuid() != 0, reason="port 25 needs root")
def test_random_loopback_address_on_port_25() -> None:
    with SmtpSink.on_random_loopback(port=25, tls=True) as sink:
        assert sink.port == 25 and sink.host.startswith("127.") and sink.host != "127.0.0.1"
        context = ssl.create_default_context(cadata=(sink.tls_cert_pem or b"").decode())
        with smtplib.SMTP(sink.host, 25, local_hostname="client.test", timeout=5) as c:
            c.starttls(context=context)  # the random address is in the certificate
            c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
        assert sink.wait_for_sync(1)[0].tls


@pytest.mark.parametrize(
    ("given", "wire"),
    [
        ("250 OK", "250 OK"),
        ("250", "250"),
        ("550-5.1.1 a\n550 5.1.1 b", "550-5.1.1 a\r\n550 5.1.1 b"),
        ("550 5.1.1 a\r\n550 5.1.1 b", "550-5.1.1 a\r\n550 5.1.1 b"),
        ("451 4.7.1 a\nb\n", "451-4.7.1 a\r\n451 b"),
    ],
)
def test_normalise_reply(given: str, wire: str) -> None:
    assert normalise_reply(given) == wire


@pytest.mark.parametrize("bad", ["", "OK", "25 x", "2500 x"])
def test_rules_refuse_malformed_replies(bad: str) -> None:
    with pytest.raises(ValueError, match="not an SMTP reply"):
        Rule.rcpt(None, bad)


def test_helo_and_smtputf8(sink: SmtpSink) -> None:
    with client(sink) as c:
        c.helo("old.test")
        c.sendmail("a@shop.test", ["b@dest.test"], MESSAGE)
    with client(sink) as c:
        c.sendmail("a@shop.test", ["jörg@dest.test"], MESSAGE, mail_options=["SMTPUTF8"])
    first, second = sink.wait_for_sync(2)
    assert first.ehlo == "old.test"
    assert second.rcpt_tos == ("jörg@dest.test",)
    assert "SMTPUTF8" in second.mail_options
