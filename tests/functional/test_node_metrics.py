"""/metrics of any web process reports the whole node: deliveries made by `postbode serve`'s
worker processes are counted on the web port, by outcome, with the queue depth per
destination."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store, create_store
from postbode.store.schema import deliveries
from postbode.testing.factories import queue_mail
from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import Rule, SmtpSink

MESSAGES = 1000
BOUNCED = 5  # answered 550 at RCPT
DEFERRED = 5  # answered 451 at RCPT
TIMEOUT = 240.0  # an upper bound on a loaded 2-core machine


def queue(store: Store, app_id: int, count: int) -> None:
    mails = []
    for i in range(count):
        raw = (
            f"From: orders@shop.test\r\nTo: user{i}@dest.test\r\nSubject: {i}\r\n"
            f"Message-ID: <{i}@shop.test>\r\n\r\nShipped.\r\n"
        ).encode()
        mails.append((f"<{i}@shop.test>", f"user{i}@dest.test", raw))
    queue_mail(store, app_id, mails)


def sample(page: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `page` (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in page.splitlines():
        found = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if found and found.group(1) == name:
            have = ",".join(sorted((found.group(2) or "").split(","))) if found.group(2) else ""
            if have == wanted:
                return float(found.group(3))
    return 0.0


def test_the_web_port_reports_the_deliveries_of_every_worker_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    store = create_store(Settings(data_dir=data_dir))
    shop = tenancy.create_app(store, "shop")
    with SmtpSink() as sink:
        for i in range(BOUNCED):
            sink.script.add(Rule.rcpt(f"user{i}@dest.test", "550 5.1.1 User unknown"))
        for i in range(BOUNCED, BOUNCED + DEFERRED):
            sink.script.add(Rule.rcpt(f"user{i}@dest.test", "451 4.3.0 Try again later"))
        env = {
            "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
            "POSTBODE_SECRET_KEY": "test-secret-key",
            "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
            # Two worker processes from start to stop (mail queued straight into the store
            # would not start them).
            "POSTBODE_WORKER_IDLE_SECONDS": "0",
        }
        with PostbodeProcess(data_dir, env) as node:
            assert len(node.children("worker")) == 2
            queue(store, shop.app_id, MESSAGES)
            deadline = time.monotonic() + TIMEOUT
            while True:
                with store.read() as conn:
                    settled = conn.execute(
                        select(func.count()).where(
                            deliveries.c.status.in_(("delivered", "bounced", "deferred")),
                            deliveries.c.attempts > 0,
                        )
                    ).scalar_one()
                if settled == MESSAGES:
                    break
                assert time.monotonic() < deadline, f"{settled} of {MESSAGES} attempted"
                time.sleep(0.2)
            page = httpx.get(f"{node.http_url}/metrics", timeout=30).text
            # Counted in the worker processes, reported by the web role in the parent.
            delivered = MESSAGES - BOUNCED - DEFERRED
            assert sample(page, "postbode_deliveries_total", outcome="Delivered") == delivered
            assert sample(page, "postbode_deliveries_total", outcome="HardFail") == BOUNCED
            assert sample(page, "postbode_deliveries_total", outcome="SoftFail") == DEFERRED
            assert sample(page, "postbode_events_total", type="delivery.bounced") == BOUNCED
            assert sample(page, "postbode_events_total", type="delivery.deferred") == DEFERRED
            assert sample(page, "postbode_queue_depth", status="deferred") == DEFERRED
            depth = sample(
                page, "postbode_queue_depth_by_domain", domain="dest.test", status="deferred"
            )
            assert depth == DEFERRED
    store.dispose()
