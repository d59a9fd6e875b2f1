"""Prometheus metrics shared by every stage (one registry per process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from postbode.store.engine import Store

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
QUEUE_DEPTH = Gauge("postbode_queue_depth", "Deliveries by status.", ["status"])
OLDEST_QUEUED_SECONDS = Gauge(
    "postbode_oldest_queued_seconds", "Age of the oldest queued or deferred delivery."
)
IN_FLIGHT = Gauge(
    "postbode_delivery_in_flight", "Deliveries being sent now, by destination domain.", ["domain"]
)
EVENTS = Counter("postbode_events_total", "Events recorded, by type.", ["type"])

PENDING_STATUSES = ("queued", "deferred", "sending", "held")


def update_queue_gauges(store: Store) -> None:
    """Read the queue's depth and oldest waiting delivery from the store (at scrape time)."""
    from sqlalchemy import func, select

    from postbode.store.schema import deliveries, utcnow

    with store.read() as conn:
        counts: dict[str, int] = dict(
            conn.execute(
                select(deliveries.c.status, func.count())
                .where(deliveries.c.status.in_(PENDING_STATUSES))
                .group_by(deliveries.c.status)
            ).all()
        )
        oldest = conn.execute(
            select(func.min(deliveries.c.first_queued_at)).where(
                deliveries.c.status.in_(("queued", "deferred"))
            )
        ).scalar()
    for status in PENDING_STATUSES:
        QUEUE_DEPTH.labels(status).set(counts.get(status, 0))
    if oldest is not None and oldest.tzinfo is None:
        from datetime import UTC

        oldest = oldest.replace(tzinfo=UTC)
    OLDEST_QUEUED_SECONDS.set((utcnow() - oldest).total_seconds() if oldest else 0)


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
