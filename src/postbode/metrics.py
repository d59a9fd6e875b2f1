"""Prometheus metrics shared by every stage, and the node-wide /metrics page.

The processes of one node (a `postbode serve` and its children, or the `web`, `smtp` and
`worker` commands sharing a data directory) keep their counters in one directory
(prometheus-client's multiprocess mode, see `metrics_dir.py`), so any web process reports
the whole node's. Queue depths are read from the store at scrape time: the same for every
node (the queue is shared)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from postbode.store.engine import Store

# Decided once, as prometheus-client decides it when first imported (with this module).
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
QUEUE_DEPTH_DOMAINS = 100  # destinations listed in postbode_queue_depth_by_domain (the largest)

ACCEPTED_MESSAGES = Counter(
    "postbode_accepted_messages_total", "Messages accepted (250 / 202).", ["source"]
)
ACCEPTED_RECIPIENTS = Counter(
    "postbode_accepted_recipients_total", "Recipients accepted, one delivery each.", ["source"]
)
REJECTS = Counter("postbode_rejects_total", "Submissions refused, by reason.", ["source", "reason"])
ACCEPT_BATCH_SIZE = Histogram(
    "postbode_accept_batch_size",
    "Messages per group commit.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
ACCEPT_COMMIT_SECONDS = Histogram(
    "postbode_accept_commit_seconds",
    "Duration of one group commit.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
DELIVERIES = Counter("postbode_deliveries_total", "Delivery attempts by outcome.", ["outcome"])
IN_FLIGHT = Gauge(
    "postbode_delivery_in_flight",
    "Deliveries being sent now, by destination domain.",
    ["domain"],
    multiprocess_mode="livesum",  # the node's live processes together
)
EVENTS = Counter("postbode_events_total", "Events recorded, by type.", ["type"])

PENDING_STATUSES = ("queued", "deferred", "sending", "held")


class QueueCollector:
    """Queue depths read from the store when /metrics is scraped: by status, by destination
    domain (the largest `QUEUE_DEPTH_DOMAINS` waiting), and the oldest waiting delivery."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from postbode.store.schema import deliveries, utcnow

        t = deliveries
        waiting = t.c.status.in_(("queued", "deferred"))
        with self.store.read() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    select(t.c.status, func.count())
                    .where(t.c.status.in_(PENDING_STATUSES))
                    .group_by(t.c.status)
                ).all()
            )
            per_domain = conn.execute(
                select(t.c.recipient_domain, t.c.status, func.count().label("n"))
                .where(waiting)
                .group_by(t.c.recipient_domain, t.c.status)
                .order_by(func.count().desc())
                .limit(QUEUE_DEPTH_DOMAINS)
            ).all()
            oldest = conn.execute(select(func.min(t.c.first_queued_at)).where(waiting)).scalar()
        depth = GaugeMetricFamily(
            "postbode_queue_depth", "Deliveries by status.", labels=["status"]
        )
        for status in PENDING_STATUSES:
            depth.add_metric([status], counts.get(status, 0))
        yield depth
        by_domain = GaugeMetricFamily(
            "postbode_queue_depth_by_domain",
            f"Deliveries waiting (queued or deferred) by destination domain and status, the "
            f"{QUEUE_DEPTH_DOMAINS} largest.",
            labels=["domain", "status"],
        )
        for row in per_domain:
            by_domain.add_metric([row.recipient_domain, row.status], row.n)
        yield by_domain
        if oldest is not None and oldest.tzinfo is None:
            from datetime import UTC

            oldest = oldest.replace(tzinfo=UTC)
        yield GaugeMetricFamily(
            "postbode_oldest_queued_seconds",
            "Age of the oldest queued or deferred delivery.",
            value=(utcnow() - oldest).total_seconds() if oldest else 0,
        )


class NodeCollector:
    """The node's metrics: what every process sharing the metrics directory counted, then
    what only this process knows (metrics nothing counted yet, which the directory has no
    file for, and the process's own process_* figures). Without a directory (tests, tools):
    this process's registry."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        if not self.directory:
            yield from REGISTRY.collect()
            return
        shared = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(shared, self.directory)  # type: ignore[no-untyped-call]
        seen = set()
        for family in shared.collect():
            seen.add(family.name)
            yield family
        for family in REGISTRY.collect():
            if family.name not in seen:
                yield family


def render(store: Store) -> bytes:
    """The /metrics page: the node's counters and the queue depths."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(MULTIPROCESS_DIR))
    registry.register(QueueCollector(store))
    return _generate_latest(registry)


SHAPING_WAITS = Counter(
    "postbode_shaping_waits_total",
    "Deliveries released to wait for a shaping slot, by destination domain and limit.",
    ["domain", "limit"],
)
SHAPING_SLOWDOWNS = Counter(
    "postbode_shaping_slowdowns_total",
    "Adaptive slow-downs after a throttling reply (421, too many connections …), by domain.",
    ["domain"],
)
CONTENT_SCANS = Counter(
    "postbode_content_scans_total",
    "Messages scored by rspamd, by direction (outbound, inbound) and result (clean, held, "
    "refused, error: rspamd did not answer).",
    ["direction", "result"],
)
CONTENT_SCAN_SECONDS = Histogram(
    "postbode_content_scan_seconds",
    "Time rspamd took to score a message, as the accept path waits for it.",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
