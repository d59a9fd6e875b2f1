"""End to end: real bounces from a real Postfix and from a scripted MX reach Postbode's return
path, bounce their deliveries, suppress bad addresses (and only those), and hostile input to
the return path gets bounded, clear replies."""

from __future__ import annotations

import contextlib
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select

from postbode import tenancy
from postbode.bounces.intake import BounceIntake
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, suppressions
from postbode.testing.postfix import Postfix, receiving_mx_config, relay_config
from postbode.testing.servers import PostbodeInProcess, send
from postbode.testing.sink import Rule, SmtpSink

RETURN = "return.postbode.localhost"
REPUTATION_REPLY = "550 5.7.1 Service unavailable; client host blocked using a reputation list"


@pytest.fixture(autouse=True)
def _fast_dkim_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tenancy.generate_dkim_key(1024)
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return created


@contextlib.contextmanager
def postbode_for(settings: Settings, store: Store, mx: str) -> Iterator[PostbodeInProcess]:
    """Postbode with its return path registered, sending mail for dest.test to `mx`."""
    settings = settings.model_copy(
        update={"transport_map": f"dest.test={mx}", "smtp_hostname": "mta.postbode.test"}
    )
    with PostbodeInProcess(settings, store, local=[BounceIntake(settings, store)]) as server:
        yield server


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll the store until `predicate` holds (a bounce arrives when the remote sends it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def rows(store: Store) -> dict[str, dict[str, Any]]:
    """The latest delivery per recipient."""
    with store.read() as conn:
        found = conn.execute(select(deliveries).order_by(deliveries.c.id)).mappings().all()
    return {r["recipient"]: dict(r) for r in found}


def statuses(store: Store) -> dict[str, str]:
    return {k: v["status"] for k, v in rows(store).items()}


def listed(store: Store) -> dict[str, tuple[Any, ...]]:
    with store.read() as conn:
        found = conn.execute(select(suppressions)).mappings().all()
    return {r["email"]: (r["reason"], r["source"], r["stream"], r["expires_at"]) for r in found}


def event_types(store: Store, recipient: str) -> list[str]:
    with store.read() as conn:
        return list(
            conn.execute(
                select(events.c.type).where(events.c.recipient == recipient).order_by(events.c.id)
            ).scalars()
        )


# -- a real DSN from Postfix ----------------------------------------------------------------


@pytest.fixture
def postfix_mx() -> Iterator[Postfix]:
    """Postfix as the MX of dest.test: alice exists, sync@ is refused at RCPT, any other
    address is accepted and then bounced by Postfix itself with a DSN to the envelope sender.
    Started by the test, once Postbode's port (its relayhost) is known."""
    pf = Postfix(
        config=receiving_mx_config(
            ["dest.test"],
            mailboxes=["alice@dest.test"],
            replies={"sync@dest.test": "550 5.1.1 User unknown"},
        )
    )
    try:
        yield pf
    finally:
        pf.stop()


@pytest.fixture
def with_postfix(
    settings: Settings, store: Store, postfix_mx: Postfix
) -> Iterator[tuple[PostbodeInProcess, Postfix]]:
    with postbode_for(settings, store, f"127.0.0.1:{postfix_mx.port}") as server:
        # Everything not for dest.test, DSNs to the return path above all, goes to Postbode.
        postfix_mx.config.update(relay_config("127.0.0.1", server.port, tls="may"))
        postfix_mx.start()
        yield server, postfix_mx


def test_a_postfix_dsn_bounces_the_delivery_and_suppresses_the_address(
    with_postfix: tuple[PostbodeInProcess, Postfix], shop: tenancy.NewApp, store: Store
) -> None:
    server, pf = with_postfix
    send(server, shop, ["alice@dest.test", "nobody@dest.test"])
    # Postfix accepts both (RFC 5321 §3.3 lets it), then bounces nobody@ on its own ...
    wait_for(
        lambda: statuses(store) == {"alice@dest.test": "delivered", "nobody@dest.test": "bounced"}
    )
    token = rows(store)["nobody@dest.test"]["verp_token"]
    # ... with a DSN from <> that it relayed to Postbode, which took it.
    sent = pf.wait_for_log(rf"to=<{token}@{re.escape(RETURN)}>.*status=sent \((.*)\)")
    assert "250 2.0.0 Ok: bounce recorded" in sent.group(1)
    assert len(pf.mailbox("alice")) == 1

    nobody = rows(store)["nobody@dest.test"]
    assert (nobody["bounce_category"], nobody["bounce_status"], nobody["hard"]) == (
        "user_unknown",
        "5.1.1",
        True,
    )
    assert "unknown user" in nobody["last_reply"]
    assert event_types(store, "nobody@dest.test") == [
        "delivery.queued",
        "delivery.delivered",
        "delivery.bounced",
    ]
    with store.read() as conn:
        bounced = conn.execute(
            select(events.c.data).where(events.c.type == "delivery.bounced")
        ).scalar_one()
    assert bounced["source"] == "dsn" and bounced["hard"] is True
    assert listed(store) == {"nobody@dest.test": ("user_unknown", "bounce", "all", None)}

    # The next message to that address is suppressed at accept, and never leaves.
    send(server, shop, ["nobody@dest.test"], subject="again")
    with store.read() as conn:
        latest = (
            conn.execute(
                select(deliveries.c.status)
                .where(deliveries.c.recipient == "nobody@dest.test")
                .order_by(deliveries.c.id.desc())
            )
            .scalars()
            .first()
        )
    assert latest == "suppressed"
    assert rows(store)["alice@dest.test"]["status"] == "delivered"


def test_a_sync_refusal_and_a_dsn_for_the_same_failure_end_alike(
    with_postfix: tuple[PostbodeInProcess, Postfix], shop: tenancy.NewApp, store: Store
) -> None:
    server, _ = with_postfix
    send(server, shop, ["sync@dest.test", "async@dest.test"])
    wait_for(lambda: statuses(store) == {"sync@dest.test": "bounced", "async@dest.test": "bounced"})
    found = rows(store)
    sync, late = found["sync@dest.test"], found["async@dest.test"]
    assert "550 5.1.1" in sync["last_reply"]  # refused at RCPT, in the SMTP session

    def state(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["status"], row["bounce_category"], row["bounce_status"], row["hard"]

    assert state(sync) == state(late) == ("bounced", "user_unknown", "5.1.1", True)
    entries = listed(store)
    assert (
        entries["sync@dest.test"]
        == entries["async@dest.test"]
        == ("user_unknown", "bounce", "all", None)
    )
    assert event_types(store, "sync@dest.test")[-1] == "delivery.bounced"
    assert event_types(store, "async@dest.test")[-2:] == ["delivery.delivered", "delivery.bounced"]


# -- a scripted MX: reputation blocks, and DSNs sent by hand ---------------------------------


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def with_sink(settings: Settings, store: Store, sink: SmtpSink) -> Iterator[PostbodeInProcess]:
    with postbode_for(settings, store, f"{sink.host}:{sink.port}") as server:
        yield server


def dsn(
    recipient: str,
    status: str,
    diagnostic: str,
    *,
    action: str = "failed",
    original: bytes = b"",
) -> bytes:
    """An RFC 3464 DSN as a remote MTA would send it after accepting the message."""
    head = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.dest.test>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n'
        "\r\n--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        "--R\r\nContent-Type: message/rfc822\r\n\r\n"
    ).encode()
    return (
        head
        + (original or f"To: {recipient}\r\nSubject: Hi\r\n\r\nHi\r\n".encode())
        + (b"\r\n--R--\r\n")
    )


def to_return_path(server: PostbodeInProcess, rcpt: str, data: bytes) -> tuple[int, str]:
    """Send `data` from <> to `rcpt`, as a remote MTA returns mail; (code, text) of the reply
    to the end of DATA, or of the first refusal."""
    with smtplib.SMTP(server.host, server.port, timeout=60) as client:
        client.ehlo("mx.dest.test")
        code, text = client.mail("<>")
        if code == 250:
            code, text = client.rcpt(rcpt)
        if code == 250:
            try:
                code, text = client.data(data)
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
        assert client.noop()[0] == 250  # the session survives whatever came before
    return code, text.decode()


def delivered_token(
    server: PostbodeInProcess, app: tenancy.NewApp, sink: SmtpSink, store: Store, rcpt: str
) -> str:
    """Send to `rcpt` through the sink, which accepts; the envelope sender it saw."""
    before = len(sink.messages)
    send(server, app, [rcpt])
    received = sink.wait_for_sync(before + 1, timeout=15)[-1]
    wait_for(lambda: any(r["status"] == "delivered" for r in _deliveries_to(store, rcpt)))
    assert received.mail_from.endswith(f"@{RETURN}")
    return received.mail_from


def _deliveries_to(store: Store, rcpt: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [
            dict(r)
            for r in conn.execute(
                select(deliveries).where(deliveries.c.recipient == rcpt).order_by(deliveries.c.id)
            ).mappings()
        ]


def test_a_sync_refusal_is_classified_with_the_command_it_answered(
    with_sink: PostbodeInProcess, shop: tenancy.NewApp, sink: SmtpSink, store: Store
) -> None:
    # The same code-less words at RCPT and after the end of DATA: RFC 5321 §3.3 verifies
    # recipients at RCPT, so only there do they say the address is bad; after DATA the
    # server had taken the recipient, and a content filter answered.
    words = "550 No such user here"
    sink.script.add(Rule.rcpt("ivy@dest.test", words))
    sink.script.add(Rule.data(words, match="jo@dest.test"))
    send(with_sink, shop, ["ivy@dest.test"])
    send(with_sink, shop, ["jo@dest.test"], subject="after data")
    wait_for(
        lambda: (
            [r["status"] for r in _deliveries_to(store, "ivy@dest.test")] == ["bounced"]
            and [r["status"] for r in _deliveries_to(store, "jo@dest.test")] == ["bounced"]
        )
    )
    [ivy] = _deliveries_to(store, "ivy@dest.test")
    [jo] = _deliveries_to(store, "jo@dest.test")
    assert (ivy["bounce_category"], ivy["hard"]) == ("user_unknown", True)
    assert (jo["bounce_category"], jo["hard"]) == ("blocked", False)
    assert "jo@dest.test" not in listed(store)
    assert listed(store)["ivy@dest.test"][0] == "user_unknown"


def test_a_reputation_block_fails_as_blocked_and_never_suppresses(
    with_sink: PostbodeInProcess, shop: tenancy.NewApp, sink: SmtpSink, store: Store
) -> None:
    sink.script.add(Rule.rcpt("alice@dest.test", REPUTATION_REPLY))
    for i in range(3):  # as often as the soft-bounce rule would need
        send(with_sink, shop, ["alice@dest.test"], subject=f"sync {i}")
        wait_for(
            lambda i=i: (
                [r["status"] for r in _deliveries_to(store, "alice@dest.test")]
                == ["bounced"] * (i + 1)
            )
        )
    # The same refusal reported later in DSNs (the remote accepted, then its filter said no).
    for _ in range(3):
        token = delivered_token(with_sink, shop, sink, store, "bob@dest.test")
        code, _ = to_return_path(with_sink, token, dsn("bob@dest.test", "5.7.1", REPUTATION_REPLY))
        assert code == 250
    wait_for(
        lambda: [r["status"] for r in _deliveries_to(store, "bob@dest.test")] == ["bounced"] * 3
    )
    for rcpt in ("alice@dest.test", "bob@dest.test"):
        assert {(r["bounce_category"], r["hard"]) for r in _deliveries_to(store, rcpt)} == {
            ("blocked", False)
        }
    assert listed(store) == {}
    send(with_sink, shop, ["bob@dest.test"], subject="still welcome")
    assert _deliveries_to(store, "bob@dest.test")[-1]["status"] != "suppressed"


def test_repeated_mailbox_full_dsns_suppress_for_a_while(
    with_sink: PostbodeInProcess, shop: tenancy.NewApp, sink: SmtpSink, store: Store
) -> None:
    full = "552 5.2.2 <carol@dest.test>: Mailbox full"
    for _ in range(3):
        token = delivered_token(with_sink, shop, sink, store, "carol@dest.test")
        assert to_return_path(with_sink, token, dsn("carol@dest.test", "5.2.2", full))[0] == 250
    (reason, source, stream, expires_at) = listed(store)["carol@dest.test"]
    assert (reason, source, stream) == ("mailbox_full", "bounce", "all") and expires_at is not None


def test_a_delay_report_leaves_the_delivery_delivered(
    with_sink: PostbodeInProcess, shop: tenancy.NewApp, sink: SmtpSink, store: Store
) -> None:
    token = delivered_token(with_sink, shop, sink, store, "dave@dest.test")
    report = dsn("dave@dest.test", "4.4.1", "connect to mx2.dest.test: timed out", action="delayed")
    assert to_return_path(with_sink, token, report)[0] == 250
    assert statuses(store)["dave@dest.test"] == "delivered"
    assert event_types(store, "dave@dest.test")[-1] == "delivery.deferred"
    assert listed(store) == {}


# -- hostile input at the return path ---------------------------------------------------------


def nested(depth: int) -> bytes:
    parts = [
        b"From: MAILER-DAEMON@mx.dest.test\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
    ]
    for i in range(depth):
        parts.append(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode())
    parts.append(b"Content-Type: text/plain\r\n\r\nUser unknown\r\n")
    parts.extend(f"--b{i}--\r\n".encode() for i in reversed(range(depth)))
    return b"".join(parts)


BROKEN_MIME = (
    b"From: MAILER-DAEMON@mx.dest.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
    b'Content-Type: multipart/report; boundary="never-used"; report-type=delivery-status\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"--wrong\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"!!!not base64 at all\x00\xff\xfe=?utf-8?B?broken?=\r\n"
    b"Final-Recipient: rfc822; \r\nStatus: 9.9.9.9.9\r\nAction: \r\n"
    b"--wrong\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\n\xc3\x28\xa0\xa1\r\n"
)


def test_hostile_reports_get_bounded_clear_replies(
    with_sink: PostbodeInProcess, shop: tenancy.NewApp, sink: SmtpSink, store: Store
) -> None:
    token = delivered_token(with_sink, shop, sink, store, "erin@dest.test")
    user_unknown = dsn("erin@dest.test", "5.1.1", "550 5.1.1 <erin@dest.test>: User unknown")

    # Nobody else's address, and no made-up token: refused at RCPT.
    assert to_return_path(with_sink, "erin@dest.test", b"x")[0] == 554
    assert to_return_path(with_sink, f"{'ab' * 12}@{RETURN}", user_unknown) == (
        550,
        "5.1.1 Unknown return path",
    )

    # 20 MB is beyond the cap for mail without AUTH: 552 5.3.4 as it streams in, said
    # plainly, nothing applied.
    code, text = to_return_path(with_sink, token, user_unknown + b"\r\n" + _filler(20 << 20))
    assert code == 552 and text.startswith("5.3.4 Message too big")
    assert statuses(store)["erin@dest.test"] == "delivered"

    # 9 MB with the report at the top, as RFC 3464 §2 puts it: parsed from its head.
    big = dsn("erin@dest.test", "5.1.1", "550 5.1.1 User unknown", original=_filler(9 << 20))
    assert to_return_path(with_sink, token, big)[0] == 250
    assert statuses(store)["erin@dest.test"] == "bounced"
    assert rows(store)["erin@dest.test"]["bounce_category"] == "user_unknown"

    # Garbage of every kind gets a clear answer and breaks nothing: broken MIME (bad
    # boundaries, base64 that is none, NUL and 8-bit bytes, unknown charsets), 5000 nested
    # multiparts, a 4.5 MB header block. Each is taken: a bounce is never bounced back.
    frank = delivered_token(with_sink, shop, sink, store, "frank@dest.test")
    assert to_return_path(with_sink, frank, BROKEN_MIME)[0] == 250
    assert to_return_path(with_sink, frank, nested(5000))[0] == 250
    junk = b"\r\n".join([b"X-Junk: " + b"a" * 900] * 5000) + b"\r\n\r\nhi\r\n"
    assert to_return_path(with_sink, frank, junk) == (250, "2.0.0 Ok: not bounce dropped")
    # (The broken one still says "Undelivered Mail" from MAILER-DAEMON to frank's return
    # path: it is read as the bounce it claims to be, reason unknown, not suppressing.)
    assert statuses(store)["frank@dest.test"] == "bounced"
    assert rows(store)["frank@dest.test"]["hard"] is False

    # A bounce of a bounce: a DSN about a DSN to another return path. It is about the
    # token's delivery, applied once, answered 250, and nothing is sent anywhere.
    gina = delivered_token(with_sink, shop, sink, store, "gina@dest.test")
    inner = dsn("gina@dest.test", "5.2.2", "552 5.2.2 Mailbox full")
    outer = dsn(f"{'cd' * 12}@{RETURN}", "5.1.1", "550 5.1.1 No such user", original=inner)
    messages_before = len(sink.messages)
    assert to_return_path(with_sink, gina, outer) == (250, "2.0.0 Ok: bounce recorded")
    assert to_return_path(with_sink, gina, outer)[0] == 250
    assert statuses(store)["gina@dest.test"] == "bounced"
    assert event_types(store, "gina@dest.test").count("delivery.bounced") == 1
    assert len(sink.messages) == messages_before  # Postbode answered no bounce with mail

    # And the return path still works for the next, ordinary report.
    hal = delivered_token(with_sink, shop, sink, store, "hal@dest.test")
    assert to_return_path(with_sink, hal, dsn("hal@dest.test", "5.1.1", "User unknown"))[0] == 250
    assert statuses(store)["hal@dest.test"] == "bounced"
    assert set(listed(store)) >= {"erin@dest.test", "hal@dest.test"}


def _filler(size: int) -> bytes:
    """About `size` bytes of base64-like lines (76 characters, RFC 2045 §6.8)."""
    line = b"QUJD" * 19 + b"\r\n"
    return line * (size // len(line))
