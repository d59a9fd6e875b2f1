"""Hostile input at the SMTP listener: fuzzed command lines over raw sockets, valid replies only."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.servers import SmtpListener

# RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
#                             Reply-code [ SP textstring ] CRLF
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9]([ -]|$)")
QUEUED_AS = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9a-f-]{36})$")
# Whatever state the fuzz left the session in, this ends it: a CRLF ends a half-sent line,
# "." ends DATA, "*" cancels an AUTH challenge (RFC 4954 §4), and QUIT says goodbye.
CLOSING = b"\r\n.\r\n*\r\n*\r\nQUIT\r\n"
IDLE_TIMEOUT = 8.0  # generous: a loaded CI machine may take seconds to answer
VERBS = [
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "VRFY",
    "EXPN",
    "HELP",
    "AUTH",
    "STARTTLS",
    "BDAT",
    "ETRN",
    "XCLIENT",
    "QUIT",
]
FRAGMENTS = [
    b"FROM:",
    b"TO:",
    b"<orders@shop.test>",
    b"<alice@dest.test>",
    b"<>",
    b"<@relay.test,@r2.test:alice@dest.test>",
    b'<"quoted local"@dest.test>',
    b"<postmaster>",
    b"<alice@[127.0.0.1]>",
    b"<alice@[IPv6:::1]>",
    b" SIZE=",
    b"99999999999999999999999",
    b"-1",
    b" BODY=8BITMIME",
    b" BODY=BINARYMIME",
    b" SMTPUTF8",
    b" NOTIFY=SUCCESS,FAILURE",
    b" ORCPT=rfc822;alice@dest.test",
    b" RET=HDRS ENVID=x",
    b" AUTH=<>",
    b"PLAIN",
    b"LOGIN",
    b"CRAM-MD5",
    b"XOAUTH2",
    b"=",
    b"*",
    b"\x00",
    b"\r",
    b"\n",
    b"\t",
    b" ",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"\xe2\x80\x8b",
    b"\x1b[31m",
    b"%s%n",
]


def verbs() -> st.SearchStrategy[bytes]:
    known = st.sampled_from(VERBS).flatmap(
        lambda v: st.sampled_from([v, v.lower(), v.title()]).map(str.encode)
    )
    return st.one_of(known, st.binary(min_size=1, max_size=12))


def arguments(login: bytes) -> st.SearchStrategy[bytes]:
    pieces = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=10)), max_size=8)
    long = st.tuples(st.integers(900, 5000), st.sampled_from([b"A", b"\x00", b"\xe9", b" "]))
    blob = st.binary(max_size=120).map(base64.b64encode)
    return st.one_of(
        pieces.map(b"".join),
        long.map(lambda n_c: n_c[1] * n_c[0]),
        st.tuples(st.sampled_from([b"PLAIN ", b"LOGIN ", b""]), blob).map(b"".join),
        st.just(b"PLAIN " + login),
    )


def terminators() -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"", b"\r\r\n", b"\n\r"]))


def command_lines(login: bytes) -> st.SearchStrategy[bytes]:
    def line(verb: bytes, arg: bytes | None, end: bytes) -> bytes:
        if verb.upper() == b"STARTTLS" and not (arg or b"").strip():
            # A bare STARTTLS makes everything after it a TLS handshake: the submission
            # tests cover STARTTLS; here it only meets arguments (501).
            arg = b"now"
        return verb + (b" " + arg if arg is not None else b"") + end

    return st.builds(line, verbs(), st.none() | arguments(login), terminators())


def transactions() -> st.SearchStrategy[bytes]:
    """A whole MAIL / RCPT / DATA exchange with a plausible or a hostile body."""
    headers = st.sampled_from(
        [b"From: orders@shop.test\r\nSubject: fuzz\r\n\r\n", b"Subject: no from\r\n\r\n", b""]
    )
    body_lines = st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from([b".", b"..", b".\r", b"\x00", b"From: x@blog.test"]),
            st.integers(990, 3000).map(lambda n: b"x" * n),
        ),
        max_size=6,
    )
    return st.builds(
        lambda rcpt, head, lines: (
            b"MAIL FROM:<orders@shop.test>\r\nRCPT TO:<"
            + rcpt
            + b">\r\nDATA\r\n"
            + head
            + b"".join(line + b"\r\n" for line in lines)
            + b".\r\n"
        ),
        st.sampled_from([b"alice@dest.test", b"bob@dest.test", b"x", b"\xff@dest.test"]),
        headers,
        body_lines,
    )


def exchange(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send `payload` and the CLOSING lines in one go (pipelined, as a hostile client
    would); returns what the server answered until it closed, and whether it did."""
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT) as sock:
        # It may hang up early (421, too many bad commands): then read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload + CLOSING)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk


def replies(data: bytes) -> list[list[bytes]]:
    """The replies in a server's output, each as its lines; asserts RFC 5321 §4.2 syntax."""
    assert data.endswith(b"\r\n"), data[-200:]
    result: list[list[bytes]] = []
    current: list[bytes] = []
    for line in data[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), (line, data[-2000:])
        assert b"\n" not in line, line
        current.append(line)
        if line[3:4] != b"-":
            assert {part[:3] for part in current} == {line[:3]}, current  # one code per reply
            result.append(current)
            current = []
    assert not current, f"reply never finished: {current}"
    return result


class _Errors(logging.Handler):
    """Collects ERROR records: an exception inside the listener is logged as one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    loggers = [logging.getLogger(name) for name in ("mail.log", "postbode")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def listener(sqlite_store: Store, tmp_path: Path) -> Iterator[SmtpListener]:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    settings = Settings(
        data_dir=tmp_path,
        database_url=url,
        secret_key="test-secret-key",
        # The fuzz sends many bad logins; throttling has its own test in test_smtp_submission.
        smtp_auth_max_failures=1_000_000,
    )
    with SmtpListener(settings, sqlite_store) as server:
        yield server


@pytest.fixture
def shop(sqlite_store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(sqlite_store, "shop")
    tenancy.add_domain(sqlite_store, "shop", "shop.test")
    return created


def plain_login(shop: tenancy.NewApp) -> bytes:
    """The shop's credentials as an AUTH PLAIN initial response (RFC 4616)."""
    return base64.b64encode(f"\0{shop.smtp_username}\0{shop.smtp_password}".encode())


def authenticated(shop: tenancy.NewApp) -> bytes:
    return b"EHLO fuzz.test\r\nAUTH PLAIN " + plain_login(shop) + b"\r\n"


def test_fuzzed_command_lines_get_valid_replies(
    listener: SmtpListener, shop: tenancy.NewApp, sqlite_store: Store, errors: _Errors
) -> None:
    login = plain_login(shop)
    openings = st.sampled_from(  # authenticated twice as often: it opens the most doors
        [
            b"",
            b"EHLO fuzz.test\r\n",
            b"HELO fuzz.test\r\n",
            authenticated(shop),
            authenticated(shop),
        ]
    )
    acknowledged: list[uuid.UUID] = []

    @hypothesis_settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        opening=openings,
        parts=st.lists(
            st.one_of(command_lines(login), transactions(), st.binary(max_size=300)),
            min_size=1,
            max_size=10,
        ),
    )
    def check(opening: bytes, parts: list[bytes]) -> None:
        errors.records.clear()
        data, closed = exchange(listener.port, opening + b"".join(parts))
        answers = replies(data)
        assert answers[0][0].startswith(b"220 "), answers[0]
        tls = any(a[-1].startswith(b"220 ") for a in answers[1:])
        if tls:
            # A STARTTLS slipped through in the noise: the rest was a broken TLS handshake,
            # which the server waits out and then logs. Nothing more to judge here.
            return
        assert closed, f"no end after QUIT: {answers[-3:]}"
        for answer in answers:
            # aiosmtpd answers a handler's unexpected exception with "500 Error: (Type) …"
            assert b"Error: (" not in b"".join(answer), answer
        assert not errors.records, [r.getMessage() for r in errors.records]
        for answer in answers:
            if found := QUEUED_AS.match(answer[-1]):
                acknowledged.append(uuid.UUID(found[1].decode()))

    check()

    # The listener still does its job for a well-behaved client.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the listener's certificate is self-signed
    with smtplib.SMTP(listener.host, listener.port, timeout=10) as client:
        client.starttls(context=context)
        client.login(shop.smtp_username, shop.smtp_password)
        client.sendmail(
            "orders@shop.test",
            ["after@dest.test"],
            b"From: orders@shop.test\r\nSubject: still here\r\n\r\nhi\r\n",
        )
    with sqlite_store.read() as conn:
        subjects = conn.execute(select(messages.c.subject)).scalars().all()
        # every 250 "queued as" of the fuzz named a message that is really stored
        stored = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.id.in_(acknowledged))
        ).scalar_one()
    assert "still here" in subjects
    assert stored == len(set(acknowledged))


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        (b"<orders@shop.test>", b"<al\x00ice@dest.test>"),
        (b"<orders@shop.test>", b"<\x80lice@dest.test>"),
        (b"<ord\x00ers@shop.test>", b"<alice@dest.test>"),
    ],
    ids=["nul-recipient", "latin1-recipient", "nul-sender"],
)
def test_unstorable_address_is_refused_before_data(
    settings: Settings, store: Store, sender: bytes, recipient: bytes
) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    with SmtpListener(settings, store) as server:
        data, _ = exchange(
            server.port,
            authenticated(shop)
            + b"MAIL FROM:"
            + sender
            + b"\r\nRCPT TO:"
            + recipient
            + b"\r\n"
            + b"DATA\r\nFrom: orders@shop.test\r\n\r\nhi\r\n.\r\n",
        )
    codes = [answer[-1][:3] for answer in replies(data)]
    mail, rcpt = codes[3], codes[4]  # after the banner, EHLO and AUTH
    assert mail[:1] == b"5" or rcpt[:1] == b"5", codes


def test_unparsable_address_gets_a_syntax_reply(
    listener: SmtpListener, shop: tenancy.NewApp
) -> None:
    data, closed = exchange(
        listener.port,
        authenticated(shop) + b"MAIL FROM:<orders@shop.test>\r\nRCPT TO:\x00@\r\n",
    )
    assert closed
    rcpt = replies(data)[4]
    assert rcpt[-1].startswith(b"501 5.5.4"), rcpt


def test_undecodable_ehlo_name_is_refused_at_ehlo(
    listener: SmtpListener, shop: tenancy.NewApp, sqlite_store: Store
) -> None:
    data, closed = exchange(
        listener.port,
        b"EHLO caf\xe9.test\r\nAUTH PLAIN " + plain_login(shop) + b"\r\n"
        b"MAIL FROM:<orders@shop.test>\r\nRCPT TO:<alice@dest.test>\r\n"
        b"DATA\r\nFrom: orders@shop.test\r\n\r\nhi\r\n.\r\n",
    )
    assert closed
    answers = replies(data)
    assert answers[1][-1].startswith(b"501 5.5.4"), answers[1]


def test_reply_text_carries_no_control_characters(listener: SmtpListener) -> None:
    for verb in (b"FOO\x00BAR", b"FO\rO", b"\x1b[2J"):
        data, closed = exchange(listener.port, b"EHLO fuzz.test\r\n" + verb + b"\r\n")
        assert closed
        for answer in replies(data):
            for line in answer:
                # RFC 5321 §4.2: textstring = 1*(%d09 / %d32-126)
                assert all(c == 9 or 32 <= c <= 126 for c in line[4:]), line


def test_endless_line_does_not_stall_other_clients(listener: SmtpListener) -> None:
    """A client sending a megabyte without a line end keeps only its own session busy, and
    that session recovers when the line finally ends (RFC 5321 §4.5.3.1.4: 512 octets)."""
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as noisy:
        noisy.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while sent < 1_000_000 and time.monotonic() < deadline:
            try:
                sent += noisy.send(b"A" * 65536)
            except BlockingIOError:
                time.sleep(0.005)
        assert sent > 100_000

        started = time.monotonic()
        data, closed = exchange(listener.port, b"EHLO other.test\r\n")
        assert closed and time.monotonic() - started < 5
        codes = [a[-1][:3] for a in replies(data)]
        assert codes[:2] == [b"220", b"250"] and codes[-1] == b"221", codes

        noisy.setblocking(True)
        noisy.sendall(b"\r\nNOOP\r\nQUIT\r\n")
        received = b""
        while chunk := noisy.recv(65536):
            received += chunk
    assert [a[-1] for a in replies(received)][1:] == [
        b"500 5.5.2 Command line too long",
        b"250 2.0.0 OK",
        b"221 2.0.0 Bye",
    ]
