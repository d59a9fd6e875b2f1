"""Postmark's webhook payloads: Delivery, Bounce, SpamComplaint, Open, Click and
SubscriptionChange records, with bounce categories as Postmark's bounce `Type`s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import data, iso, message_fields, reply, short_id

# Postmark's bounce types (its "Bounce types" reference): name -> (TypeCode, Name).
BOUNCE_TYPES = {
    "HardBounce": (1, "Hard bounce"),
    "Transient": (2, "Message delayed"),
    "Unknown": (2048, "Unknown type"),
    "SoftBounce": (4096, "Soft bounce"),
    "SpamComplaint": (100001, "Spam complaint"),
    "ManuallyDeactivated": (100002, "Manually deactivated"),
    "Blocked": (100006, "ISP block"),
    "DMARCPolicy": (100009, "DMARC Policy"),
}
# Postbode's bounce category -> Postmark's bounce Type.
CATEGORY_TYPES = {
    "user_unknown": "HardBounce",
    "domain_invalid": "HardBounce",
    "mailbox_inactive": "HardBounce",
    "mailbox_full": "SoftBounce",
    "message_too_large": "SoftBounce",
    "content_rejected": "Blocked",
    "blocked": "Blocked",
    "auth_failure": "DMARCPolicy",
    "rate_limited": "SoftBounce",
    "expired": "SoftBounce",
    "system_error": "SoftBounce",
    "unknown": "Unknown",
}
STREAMS = {"transactional": "outbound", "broadcast": "broadcast"}
# Postbode's event type -> Postmark's RecordType; other events have no Postmark webhook.
RECORD_TYPES = {
    "delivery.delivered": "Delivery",
    "delivery.deferred": "Bounce",  # Type "Transient", as Postmark reports delays
    "delivery.bounced": "Bounce",
    "delivery.failed": "Bounce",  # expired: a soft bounce Postbode gave up on
    "message.complained": "SpamComplaint",
    "message.opened": "Open",
    "message.clicked": "Click",
    "message.unsubscribed": "SubscriptionChange",
}
EVENT_TYPES = frozenset(RECORD_TYPES)


def bounce_type(event: Mapping[Any, Any]) -> str:
    """The Postmark bounce Type of a bounce, deferral or failure event."""
    if event["type"] == "delivery.deferred":
        return "Transient"
    if event["type"] == "delivery.failed":
        return "SoftBounce"
    found = data(event)
    kind = CATEGORY_TYPES.get(str(found.get("category")), "Unknown")
    if kind == "Unknown" and found.get("hard"):
        return "HardBounce"
    return kind


def _agent(found: dict[str, Any]) -> dict[str, Any]:
    agent = found.get("user_agent") or ""
    return {
        "Client": {"Name": "", "Company": "", "Family": ""},
        "OS": {"Name": "", "Company": "", "Family": ""},
        "Platform": "Unknown",
        "UserAgent": agent,
        "Geo": {"IP": found.get("ip") or ""},
    }


def format(event: Mapping[Any, Any], message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """One Postmark webhook record (raises KeyError for an event Postmark has no record of)."""
    record_type = RECORD_TYPES[event["type"]]
    m = message_fields(message)
    found = data(event)
    at = iso(event["created_at"])
    recipient = event["recipient"] or ""
    base: dict[str, Any] = {
        "RecordType": record_type,
        "ServerID": event["app_id"],
        "MessageStream": STREAMS.get(m["stream"], "outbound"),
        "MessageID": m["id"],
        "Tag": m["tag"] or "",
        "Metadata": m["metadata"],
    }
    if record_type == "Delivery":
        return {**base, "Recipient": recipient, "DeliveredAt": at, "Details": reply(event)}
    if record_type in ("Bounce", "SpamComplaint"):
        kind = "SpamComplaint" if record_type == "SpamComplaint" else bounce_type(event)
        code, name = BOUNCE_TYPES[kind]
        inactive = kind in ("HardBounce", "SpamComplaint") or bool(found.get("hard"))
        return {
            **base,
            "ID": short_id(event),
            "Type": kind,
            "TypeCode": code,
            "Name": name,
            "Description": name,
            "Details": reply(event),
            "Email": recipient,
            "From": m["from"],
            "BouncedAt": at,
            "DumpAvailable": False,
            "Inactive": inactive,
            "CanActivate": True,
            "Subject": m["subject"],
            "Content": "",
        }
    if record_type == "Open":
        return {
            **base,
            "Recipient": recipient,
            "FirstOpen": bool(found.get("first", False)),
            "ReceivedAt": at,
            "ReadSeconds": 0,
            **_agent(found),
        }
    if record_type == "Click":
        return {
            **base,
            "Recipient": recipient,
            "ClickLocation": "HTML",
            "OriginalLink": found.get("url") or "",
            "ReceivedAt": at,
            **_agent(found),
        }
    # SubscriptionChange: the recipient unsubscribed; Postbode suppresses the address.
    return {
        **base,
        "Recipient": recipient,
        "ChangedAt": at,
        "Origin": "Recipient",
        "SuppressSending": True,
        "SuppressionReason": "ManualSuppression",
    }
