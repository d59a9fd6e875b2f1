"""End to end: mail accepted over SMTP is delivered to a sink found through real MX records."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import dkim
import dns.resolver
import pytest
from sqlalchemy import select, update

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import attempts, deliveries, events, suppressions, utcnow
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import PostbodeInProcess, send
from postbode.testing.sink import Rule, SmtpSink


@pytest.fixture
def shop(store: Store, dns_server: LoopbackDNS) -> tuple[tenancy.NewApp, dict]:
    created = tenancy.create_app(store, "shop")
    domain = tenancy.add_domain(store, "shop", "shop.test")
    public = domain["dkim_public_key"]
    dns_server.add_txt(f"{domain['dkim_selector']}._domainkey.shop.test", public)
    return created, domain


@pytest.fixture
def postbode(
    settings: Settings, store: Store, dns_server: LoopbackDNS
) -> Iterator[PostbodeInProcess]:
    settings = settings.model_copy(
        update={"dns_nameservers": dns_server.nameserver, "smtp_hostname": "mta.postbode.test"}
    )
    with PostbodeInProcess(settings, store) as server:
        yield server


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def statuses(store: Store) -> dict[str, str]:
    with store.read() as conn:
        return dict(conn.execute(select(deliveries.c.recipient, deliveries.c.status)).all())


def retry_now(store: Store) -> None:
    """Make deferred deliveries due now (instead of waiting out the backoff)."""
    with store.write() as conn:
        conn.execute(
            update(deliveries)
            .where(deliveries.c.status == "deferred")
            .values(next_attempt_at=utcnow())
        )


def test_delivered_through_mx_with_dkim_and_transcript(
    postbode: PostbodeInProcess, shop, mx_sink: SmtpSink, dns_server: LoopbackDNS, store: Store
) -> None:
    app, domain = shop
    send(postbode, app, ["alice@dest.test"])
    (received,) = mx_sink.wait_for_sync(1, timeout=15)
    assert received.rcpt_tos == ("alice@dest.test",)
    assert received.tls, "opportunistic STARTTLS was offered and should be used"
    assert received.ehlo == "mta.postbode.test"
    # VERP: the envelope sender is a per-delivery token at the return-path domain
    with store.read() as conn:
        token = conn.execute(select(deliveries.c.verp_token)).scalar_one()
    assert received.mail_from == f"{token}@{postbode.settings.return_path_domain}"

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.address[0]]
    resolver.port = dns_server.address[1]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert dkim.verify(received.data, dnsfunc=dnsfunc), "DKIM signature must verify"
    assert f"s={domain['dkim_selector']}".encode() in received.data

    wait_for(lambda: statuses(store) == {"alice@dest.test": "delivered"})
    with store.read() as conn:
        attempt = conn.execute(select(attempts)).mappings().one()
        types = conn.execute(select(events.c.type).order_by(events.c.id)).scalars().all()
    assert attempt["outcome"] == "Delivered" and attempt["reply_code"] == 250
    assert attempt["mx_host"] == "mx1.dest.test" and attempt["ip"] == mx_sink.host
    assert attempt["tls_version"] and attempt["tls_version"].startswith("TLS")
    for step in (
        "EHLO mta.postbode.test",
        "STARTTLS",
        "MAIL FROM:",
        "RCPT TO:<alice@dest.test>",
        "DATA",
        "250",
    ):
        assert step in attempt["transcript"], step
    assert "Your order has shipped" not in attempt["transcript"]  # never the body
    assert types == ["message.received", "delivery.queued", "delivery.delivered"]


def test_greylisted_twice_then_delivered_on_attempt_three(
    postbode: PostbodeInProcess, shop, mx_sink: SmtpSink, store: Store
) -> None:
    app, _ = shop
    mx_sink.script.add(
        Rule.rcpt(
            "grey@dest.test",
            "451 4.7.1 Greylisted, try again in 5 minutes",
            "451 4.7.1 Greylisted, try again in 5 minutes",
            "250 2.1.5 OK",
        )
    )
    send(postbode, app, ["grey@dest.test"])
    for attempt in (1, 2):
        wait_for(lambda a=attempt: _attempt_count(store) == a)
        assert statuses(store) == {"grey@dest.test": "deferred"}
        with store.read() as conn:
            row = conn.execute(select(deliveries)).mappings().one()
        wait_seconds = (row["next_attempt_at"] - utcnow()).total_seconds()
        assert 200 < wait_seconds <= 7200, "the 'try again in 5 minutes' hint is honoured"
        assert "451 4.7.1" in row["last_reply"]
        retry_now(store)
        postbode.worker.notify()
    mx_sink.wait_for_sync(1)
    wait_for(lambda: statuses(store) == {"grey@dest.test": "delivered"})
    with store.read() as conn:
        types = conn.execute(select(events.c.type).order_by(events.c.id)).scalars().all()
        deferred = (
            conn.execute(
                select(events.c.data)
                .where(events.c.type == "delivery.deferred")
                .order_by(events.c.id)
            )
            .scalars()
            .all()
        )
    assert types.count("delivery.deferred") == 2 and types[-1] == "delivery.delivered"
    assert all("451 4.7.1" in d["reply"] and d["next_attempt_at"] for d in deferred)
    assert [d["attempt"] for d in deferred] == [1, 2]


def _attempt_count(store: Store) -> int:
    with store.read() as conn:
        return len(conn.execute(select(attempts.c.id)).all())


def test_550_bounces_hard_and_suppresses(
    postbode: PostbodeInProcess, shop, mx_sink: SmtpSink, store: Store
) -> None:
    app, _ = shop
    mx_sink.script.add(Rule.rcpt("nobody@dest.test", "550 5.1.1 <nobody@dest.test>: User unknown"))
    send(postbode, app, ["nobody@dest.test"])
    wait_for(lambda: statuses(store) == {"nobody@dest.test": "bounced"})
    with store.read() as conn:
        row = conn.execute(select(deliveries)).mappings().one()
        bounce = conn.execute(
            select(events.c.data).where(events.c.type == "delivery.bounced")
        ).scalar_one()
        listed = conn.execute(select(suppressions.c.email, suppressions.c.reason)).all()
    assert (row["bounce_category"], row["hard"], row["attempts"]) == ("user_unknown", True, 1)
    assert bounce["hard"] is True and bounce["category"] == "user_unknown"
    assert listed == [("nobody@dest.test", "user_unknown")]
    # the next message to that address is suppressed at accept, never queued
    send(postbode, app, ["nobody@dest.test"], subject="again")
    wait_for(lambda: sorted(statuses_all(store)) == ["bounced", "suppressed"])


def statuses_all(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(select(deliveries.c.status)).scalars())


def test_reputation_block_fails_without_suppressing(
    postbode: PostbodeInProcess, shop, mx_sink: SmtpSink, store: Store
) -> None:
    app, _ = shop
    mx_sink.script.add(
        Rule.rcpt(
            "alice@dest.test",
            "550 5.7.1 Service unavailable; client host blocked using a reputation list",
        )
    )
    send(postbode, app, ["alice@dest.test"])
    wait_for(lambda: statuses(store) == {"alice@dest.test": "bounced"})
    with store.read() as conn:
        row = conn.execute(select(deliveries)).mappings().one()
        assert conn.execute(select(suppressions)).first() is None
    assert row["bounce_category"] == "blocked" and row["hard"] is False


def test_every_attempt_is_one_structured_log_line(
    postbode: PostbodeInProcess,
    shop,
    mx_sink: SmtpSink,
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = shop
    mx_sink.script.add(Rule.rcpt("nobody@dest.test", "550 5.1.1 <nobody@dest.test>: User unknown"))
    caplog.set_level("INFO", logger="postbode.delivery.attempts")
    send(postbode, app, ["ann@dest.test", "nobody@dest.test"])
    wait_for(lambda: sorted(statuses_all(store)) == ["bounced", "delivered"])
    wait_for(lambda: len([r for r in caplog.records if r.name.endswith("attempts")]) == 2)
    with store.read() as conn:
        ids = dict(conn.execute(select(deliveries.c.recipient, deliveries.c.id)).all())
    lines = {
        r.getMessage().split(" delivery=")[1].split()[0]: dict(
            field.split("=", 1) for field in r.getMessage().split()[1:]
        )
        for r in caplog.records
        if r.name == "postbode.delivery.attempts"
    }
    delivered, bounced = lines[str(ids["ann@dest.test"])], lines[str(ids["nobody@dest.test"])]
    assert delivered["app"] == str(app.app_id) and delivered["domain"] == "dest.test"
    assert delivered["mx"] == "mx1.dest.test" and delivered["outcome"] == "Delivered"
    assert delivered["status"] == "delivered" and delivered["code"] == "250"
    assert int(delivered["duration_ms"]) >= 0 and delivered["attempt"] == "1"
    assert (bounced["outcome"], bounced["status"]) == ("HardFail", "bounced")
    assert (bounced["code"], bounced["enhanced"]) == ("550", "5.1.1")
