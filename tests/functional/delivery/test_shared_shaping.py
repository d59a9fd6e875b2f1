"""Shaping holds for the whole cluster: four worker processes (two `postbode serve` nodes of two
workers each on one PostgreSQL; one node of four on SQLite) open at most the configured
connections to an MX host, and a 421 one worker meets slows every worker down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import func, select

from postbode import tenancy
from postbode.delivery.shaping import STATE_STALENESS_SECONDS
from postbode.store.engine import Store
from postbode.store.schema import (
    deliveries,
    destination_state,
)
from postbode.testing.factories import queue_mail
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import Rule, SmtpSink, Stage

MAX_CONNECTIONS = 4
WORKERS = 4
TIMEOUT = 240.0  # upper bound on a loaded 2-core machine; normally well under a minute
THROTTLED = "421 4.7.0 Too many connections, slow down"

pytestmark = [
    pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True),
    pytest.mark.timeout(600),
]


def queue(store: Store, app_id: int, count: int, tag: str) -> None:
    """`count` single-recipient messages to dest.test, queued in one transaction."""
    mails = []
    for i in range(count):
        raw = (
            f"From: Shop <orders@shop.test>\r\nTo: {tag}{i}@dest.test\r\n"
            f"Subject: Order {i}\r\nMessage-ID: <{tag}{i}@shop.test>\r\n\r\nShipped.\r\n"
        ).encode()
        mails.append((f"<{tag}{i}@shop.test>", f"{tag}{i}@dest.test", raw))
    queue_mail(store, app_id, mails)


def delivered(store: Store) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                select(func.count()).where(deliveries.c.status == "delivered")
            ).scalar_one()
        )


def wait_delivered(store: Store, count: int, nodes: list[PostbodeProcess]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while delivered(store) < count:
        for node in nodes:
            assert node.proc is not None and node.proc.poll() is None, node.log()[-3000:]
        assert time.monotonic() < deadline, f"{delivered(store)} of {count} delivered"
        time.sleep(0.1)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    # A busy receiver: each message takes 20 ms, so every worker's connections stay open
    # together (without shared slots four workers open up to sixteen).
    with SmtpSink(data_delay=0.02) as server:
        yield server


@pytest.fixture
def nodes(store: Store, sink: SmtpSink, tmp_path: Path) -> Iterator[list[PostbodeProcess]]:
    count = 1 if store.is_sqlite else 2  # SQLite: one machine
    per_node = WORKERS // count
    env = {
        "POSTBODE_DATABASE_URL": store.engine.url.render_as_string(hide_password=False),
        "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
        "POSTBODE_SMTP_HOSTNAME": "mta.postbode.test",
        "POSTBODE_SECRET_KEY": "test-secret-key",
        "POSTBODE_WORKERS": str(per_node),
        "POSTBODE_WORKER_IDLE_SECONDS": "0",  # from start to stop: mail is queued in the store
        "POSTBODE_SHAPING_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
        # Each worker sends what it claims over several connections at once (50 a connection).
        "POSTBODE_DELIVERY_BATCH_SIZE": "200",
        "POSTBODE_SHAPING_MAX_WAIT_SECONDS": "20",
    }
    with ExitStack() as stack:
        started = [
            stack.enter_context(PostbodeProcess(tmp_path / f"node{i}", env)) for i in range(count)
        ]
        for node in started:
            assert len(node.children("worker")) == per_node
        yield started


def test_the_cluster_opens_at_most_the_configured_connections_and_slows_down_together(
    store: Store, sink: SmtpSink, nodes: list[PostbodeProcess]
) -> None:
    shop = tenancy.create_app(store, "shop")

    # Four worker processes, each sending up to four connections' worth at once: without
    # shared slots the sink would see up to sixteen.
    queue(store, shop.app_id, 800, "a")
    wait_delivered(store, 800, nodes)
    peaks = [open_now for _, open_now in sink.opened()]
    assert max(peaks) <= MAX_CONNECTIONS, peaks
    assert max(peaks) > 1, "the workers never sent at once: the test proves nothing"

    # The next connection is refused with 421: whichever worker meets it halves the
    # connection limit for all (4 -> 2); within 2 s no worker opens a third.
    sink.script.add(Rule.connect(THROTTLED, "220 mx.dest.test ESMTP"))
    before = len(sink.opened())
    queue(store, shop.app_id, 400, "b")
    wait_delivered(store, 1200, nodes)
    assert sink.replies(Stage.CONNECT).count(THROTTLED) == 1
    opened = sink.opened()[before:]
    throttled_at = opened[0][0]  # the first connection after the rule is the refused one
    later = [open_now for at, open_now in opened if at > throttled_at + 2.0]
    assert later, "no connection was opened 2 s after the 421"
    assert max(later) <= MAX_CONNECTIONS // 2, later
    assert STATE_STALENESS_SECONDS < 2.0
    with store.read() as conn:
        row = conn.execute(
            select(destination_state).where(destination_state.c.domain == "dest.test")
        ).one()
    assert row.slow_low == 0.5 and row.slow_reason == "421 4.7.0"
