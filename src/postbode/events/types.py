"""The one list of event types: the same strings in code, API, webhooks, metrics and UI."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    MESSAGE_RECEIVED = "message.received"
    DELIVERY_QUEUED = "delivery.queued"
    DELIVERY_DEFERRED = "delivery.deferred"
    DELIVERY_DELIVERED = "delivery.delivered"
    DELIVERY_BOUNCED = "delivery.bounced"
    DELIVERY_FAILED = "delivery.failed"  # expired, or a hard failure without a bounce
    DELIVERY_SUPPRESSED = "delivery.suppressed"
    DELIVERY_HELD = "delivery.held"
    DELIVERY_RELEASED = "delivery.released"
    DELIVERY_RETRIED = "delivery.retried"  # put back in the queue by hand, after a deferral
    DELIVERY_CANCELLED = "delivery.cancelled"
    MESSAGE_OPENED = "message.opened"
    MESSAGE_CLICKED = "message.clicked"
    MESSAGE_COMPLAINED = "message.complained"
    MESSAGE_UNSUBSCRIBED = "message.unsubscribed"
    INBOUND_RECEIVED = "inbound.received"  # stored, before 250 to the sending server
    INBOUND_DELIVERED = "inbound.delivered"  # the route's endpoint answered 2xx
    INBOUND_FAILED = "inbound.failed"  # retries ran out, or the route is gone
    DOMAIN_DNS_CHANGED = "domain.dns_changed"
    APP_ALERT = "app.alert"
