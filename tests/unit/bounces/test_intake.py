"""The return path: which addresses it owns, tokens at RCPT, matching reports to deliveries."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.bounces import intake as intake_module
from postbode.bounces.intake import BounceIntake
from postbode.bounces.parse import BounceReport
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import deliveries, events, messages, suppressions
from postbode.testing.factories import make_queued_message

RETURN = "return.postbode.localhost"


@pytest.fixture(autouse=True)
def _fast_dkim_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    key = tenancy.generate_dkim_key(1024)
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)


@pytest.fixture
def shop(store: Store) -> int:
    app = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "shop.test")
    return app.app_id


@pytest.fixture
def intake(settings: Settings, store: Store) -> BounceIntake:
    return BounceIntake(settings, store)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


def sent(store: Store, app_id: int, rcpt: str = "bob@dest.test") -> tuple[uuid.UUID, str, str]:
    """A delivered delivery: (id, VERP token, the message's Message-ID)."""
    message_id, (delivery_id,) = make_queued_message(store, app_id, [rcpt])
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(status="delivered", attempts=1)
        )
        token = conn.execute(
            select(deliveries.c.verp_token).where(deliveries.c.id == delivery_id)
        ).scalar_one()
        mid = conn.execute(
            select(messages.c.message_id_header).where(messages.c.id == message_id)
        ).scalar_one()
    return delivery_id, token, mid


def dsn(
    recipient: str,
    message_id: str,
    status: str = "5.1.1",
    diagnostic: str = "550 5.1.1 User unknown",
) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.dest.test (Mail Delivery System)\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: orders@shop.test\r\nTo: {recipient}\r\nMessage-ID: {message_id}\r\n"
        "\r\n--B--\r\n"
    ).encode()


VACATION = (
    b"From: bob@dest.test\r\nTo: tok@return.postbode.localhost\r\n"
    b"Subject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\n"
    b"I am out of the office until Monday.\r\n"
)


def status_of(store: Store, delivery_id: uuid.UUID) -> str:
    with store.read() as conn:
        return str(
            conn.execute(
                select(deliveries.c.status).where(deliveries.c.id == delivery_id)
            ).scalar_one()
        )


def test_it_owns_the_return_path_domain_and_pb_bounces_names(intake: BounceIntake) -> None:
    assert intake.owns(f"abc@{RETURN}")
    assert intake.owns("abc@Return.Postbode.Localhost.")
    assert intake.owns("abc@pb-bounces.shop.test")
    assert not intake.owns("abc@shop.test")
    assert not intake.owns("abc@pb-bounces.test")
    assert not intake.owns(f"abc@x.{RETURN}")


def test_recipients_are_checked_at_rcpt(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    _, token, _ = sent(store, shop)
    other = tenancy.create_app(store, "other").app_id
    _, foreign, _ = sent(store, other)

    def check(address: str) -> str | None:
        return run(loop, intake.check_recipient(address))  # type: ignore[no-any-return]

    assert check(f"{token}@{RETURN}") is None
    assert check(f"{token}@pb-bounces.shop.test") is None
    assert check(f"{token.upper()}@{RETURN}") is None
    assert check(f"postmaster@{RETURN}") is None
    assert check("abuse@pb-bounces.shop.test") is None
    assert check(f"{'0' * 24}@{RETURN}") == "550 5.1.1 Unknown return path"
    assert check(f"hello.world@{RETURN}") == "550 5.1.1 Unknown return path"
    # Another app's token is no return path of shop.test's
    assert check(f"{foreign}@pb-bounces.shop.test") == "550 5.1.1 Unknown return path"
    assert check(f"{token}@pb-bounces.nobody.test") == "550 5.1.2 Unknown return-path domain"


def test_a_domain_added_later_is_found_without_waiting_for_the_cache(
    intake: BounceIntake,
    store: Store,
    shop: int,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(loop, intake.check_recipient("postmaster@pb-bounces.shop.test")) is None
    tenancy.add_domain(store, "shop", "later.test")
    monkeypatch.setattr(intake_module, "DOMAIN_RELOAD_MIN_SECONDS", 0.0)
    assert run(loop, intake.check_recipient("postmaster@pb-bounces.later.test")) is None


def test_a_dsn_to_the_token_bounces_its_delivery(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    delivery_id, token, mid = sent(store, shop)
    reply = run(loop, intake.receive("", [f"{token}@{RETURN}"], dsn("bob@dest.test", mid)))
    assert reply == "250 2.0.0 Ok: bounce recorded"
    assert status_of(store, delivery_id) == "bounced"
    with store.read() as conn:
        assert conn.execute(select(suppressions.c.email)).scalars().all() == ["bob@dest.test"]


def test_the_token_wins_over_what_the_report_names(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    """A forwarded address fails under its new name; VERP still knows the delivery."""
    delivery_id, token, _ = sent(store, shop)
    raw = dsn("bob.smith@elsewhere.test", "<unrelated@other.test>")
    run(loop, intake.receive("", [f"{token}@{RETURN}"], raw))
    assert status_of(store, delivery_id) == "bounced"


def test_without_a_token_the_message_id_and_recipient_only_note_the_delivery(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    bob, _, mid = sent(store, shop, "bob@dest.test")
    reply = run(
        loop, intake.receive("x@dest.test", [f"postmaster@{RETURN}"], dsn("Bob@dest.test", mid))
    )
    assert reply == "250 2.0.0 Ok: bounce noted; without a return-path token it changes nothing"
    assert status_of(store, bob) == "delivered"


def test_a_report_about_someone_else_matches_nothing(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    bob, _, mid = sent(store, shop, "bob@dest.test")
    for raw in (dsn("mallory@dest.test", mid), dsn("bob@dest.test", "<other@shop.test>")):
        reply = run(loop, intake.receive("", [f"bounces@{RETURN}"], raw))
        assert reply == "250 2.0.0 Ok: bounce matches no delivery, dropped"
    assert status_of(store, bob) == "delivered"


def test_pb_bounces_addresses_match_only_their_apps_messages(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    other = tenancy.create_app(store, "other").app_id
    tenancy.add_domain(store, "other", "other.test")
    theirs, token, mid = sent(store, other, "bob@dest.test")
    for domain in ("shop.test", "other.test"):
        reply = run(
            loop, intake.receive("", [f"postmaster@pb-bounces.{domain}"], dsn("bob@dest.test", mid))
        )
        noted = "noted" in reply
        assert noted == (domain == "other.test"), reply
    assert status_of(store, theirs) == "delivered"
    run(loop, intake.receive("", [f"{token}@pb-bounces.shop.test"], dsn("bob@dest.test", mid)))
    assert status_of(store, theirs) == "delivered"
    run(loop, intake.receive("", [f"{token}@pb-bounces.other.test"], dsn("bob@dest.test", mid)))
    assert status_of(store, theirs) == "bounced"


def test_auto_replies_and_other_mail_are_taken_and_dropped(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    delivery_id, token, _ = sent(store, shop)
    assert run(loop, intake.receive("bob@dest.test", [f"{token}@{RETURN}"], VACATION)) == (
        "250 2.0.0 Ok: auto reply dropped"
    )
    spam = b"From: x@spam.test\r\nSubject: cheap pills\r\n\r\nbuy now\r\n"
    assert run(loop, intake.receive("x@spam.test", [f"{token}@{RETURN}"], spam)) == (
        "250 2.0.0 Ok: not bounce dropped"
    )
    assert status_of(store, delivery_id) == "delivered"
    with store.read() as conn:
        assert conn.execute(select(events.c.type)).scalars().all() == []


def test_a_complaint_at_abuse_is_matched_by_the_returned_return_path(
    intake: BounceIntake, store: Store, shop: int, loop: asyncio.AbstractEventLoop
) -> None:
    delivery_id, token, mid = sent(store, shop)
    raw = (
        "From: fbl@isp.test\r\nSubject: FW: complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\r\n'
        "\r\n--A\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--A\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nVersion: 1\r\n"
        "--A\r\nContent-Type: message/rfc822\r\n\r\n"
        f"Return-Path: <{token}@{RETURN}>\r\n"
        f"From: orders@shop.test\r\nTo: bob@dest.test\r\nMessage-ID: {mid}\r\n\r\nHi\r\n"
        "--A--\r\n"
    ).encode()
    without_path = raw.replace(f"Return-Path: <{token}@{RETURN}>\r\n".encode(), b"")
    assert "noted" in run(loop, intake.receive("", [f"abuse@{RETURN}"], without_path))
    assert run(loop, intake.receive("", [f"abuse@{RETURN}"], raw)) == (
        "250 2.0.0 Ok: complaint recorded"
    )
    with store.read() as conn:
        assert conn.execute(select(events.c.type)).scalars().all() == ["message.complained"]
        assert conn.execute(select(suppressions.c.reason)).scalars().all() == ["complaint"]
    assert status_of(store, delivery_id) == "delivered"


def test_an_oversized_report_is_refused_unread(
    settings: Settings,
    store: Store,
    shop: int,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = BounceIntake(settings.model_copy(update={"bounce_max_message_size": 1000}), store)
    monkeypatch.setattr(intake_module, "parse", None)  # must not be reached
    delivery_id, token, _ = sent(store, shop)
    reply = run(loop, small.receive("", [f"{token}@{RETURN}"], b"x" * 1001))
    assert reply.startswith("552 5.3.4 ")
    assert status_of(store, delivery_id) == "delivered"


def test_a_parse_that_runs_away_is_refused_in_bounded_time(
    intake: BounceIntake,
    store: Store,
    shop: int,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    real_parse = intake_module.parse

    def stuck(raw: bytes, rules: object = None) -> BounceReport:
        release.wait(30)
        return BounceReport("not_bounce")

    monkeypatch.setattr(intake_module, "parse", stuck)
    monkeypatch.setattr(intake_module, "PARSE_CONCURRENCY", 1)
    intake.parse_timeout = 0.1
    delivery_id, token, mid = sent(store, shop)
    report = dsn("bob@dest.test", mid)
    try:
        reply = run(loop, intake.receive("", [f"{token}@{RETURN}"], report))
        assert reply.startswith("554 5.6.0 ")
        # The runaway thread still holds the only parsing slot: the next report waits for
        # it no longer than the timeout either, and runs no second thread.
        monkeypatch.setattr(intake_module, "parse", real_parse)
        assert run(loop, intake.receive("", [f"{token}@{RETURN}"], report)).startswith("554 ")
        assert status_of(store, delivery_id) == "delivered"
    finally:
        release.set()
    intake.parse_timeout = 10.0
    assert run(loop, intake.receive("", [f"{token}@{RETURN}"], report)) == (
        "250 2.0.0 Ok: bounce recorded"
    )


def test_a_store_failure_asks_the_sender_to_retry(
    intake: BounceIntake,
    store: Store,
    shop: int,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> list[str]:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(intake, "apply", broken)
    _, token, mid = sent(store, shop)
    reply = run(loop, intake.receive("", [f"{token}@{RETURN}"], dsn("bob@dest.test", mid)))
    assert reply.startswith("451 4.3.0 ")
