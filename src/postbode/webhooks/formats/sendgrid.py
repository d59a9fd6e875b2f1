"""SendGrid's event webhook payloads: JSON arrays of events (processed, deferred, delivered,
bounce, dropped, open, click, spamreport, unsubscribe), metadata as custom arguments."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from postbode.endpoints.signing import secret_bytes

from .common import data, epoch, message_fields, reply

# Postbode's event type -> SendGrid's event name.
EVENTS = {
    "delivery.queued": "processed",
    "delivery.deferred": "deferred",
    "delivery.delivered": "delivered",
    "delivery.bounced": "bounce",
    "delivery.failed": "bounce",
    "delivery.suppressed": "dropped",
    "message.opened": "open",
    "message.clicked": "click",
    "message.complained": "spamreport",
    "message.unsubscribed": "unsubscribe",
}
EVENT_TYPES = frozenset(EVENTS)
# Postbode's bounce category -> SendGrid's bounce_classification.
CLASSIFICATIONS = {
    "user_unknown": "Invalid Address",
    "domain_invalid": "Invalid Address",
    "mailbox_inactive": "Mailbox Unavailable",
    "mailbox_full": "Mailbox Unavailable",
    "message_too_large": "Content",
    "content_rejected": "Content",
    "blocked": "Reputation",
    "auth_failure": "Technical",
    "rate_limited": "Frequency or Volume",
    "expired": "Technical",
    "system_error": "Technical",
    "unknown": "Unclassified",
}
# Keys SendGrid itself puts in an event: custom arguments never override them.
RESERVED = frozenset(
    {
        "email",
        "timestamp",
        "event",
        "sg_event_id",
        "sg_message_id",
        "smtp-id",
        "category",
        "response",
        "reason",
        "status",
        "type",
        "bounce_classification",
        "attempt",
        "url",
        "useragent",
        "ip",
        "tls",
        "asm_group_id",
    }
)


def format(event: Mapping[Any, Any], message: Mapping[Any, Any] | None) -> dict[str, Any]:
    """One SendGrid event (an item of the array a request carries); KeyError for an event
    SendGrid has no name for."""
    name = EVENTS[event["type"]]
    m = message_fields(message)
    found = data(event)
    out: dict[str, Any] = {
        key: value for key, value in m["metadata"].items() if key not in RESERVED
    }
    out.update(
        {
            "email": event["recipient"] or "",
            "timestamp": epoch(event["created_at"]),
            "event": name,
            "sg_event_id": str(event["id"]),
            "sg_message_id": f"{m['id']}.{event['delivery_id'] or ''}",
            "smtp-id": m["header"],
            "category": [m["tag"]] if m["tag"] else [],
        }
    )
    if "asm_group_id" in m["metadata"]:
        with contextlib.suppress(ValueError):
            out["asm_group_id"] = int(m["metadata"]["asm_group_id"])
    if name == "delivered":
        out["response"] = reply(event)
    elif name == "deferred":
        out["response"] = reply(event)
        out["attempt"] = str(found.get("attempt", 1))
    elif name == "bounce":
        category = str(
            found.get("category")
            or ("expired" if event["type"] == "delivery.failed" else "unknown")
        )
        out["reason"] = reply(event)
        out["status"] = str(found.get("status") or ("5.0.0" if found.get("hard") else "4.0.0"))
        out["type"] = "bounce" if found.get("hard") else "blocked"
        out["bounce_classification"] = CLASSIFICATIONS.get(category, "Unclassified")
    elif name == "dropped":
        out["reason"] = "Bounced Address"
    elif name in ("open", "click"):
        out["useragent"] = found.get("user_agent") or ""
        out["ip"] = found.get("ip") or ""
        if name == "click":
            out["url"] = found.get("url") or ""
    return out


# -- the Signed Event Webhook: ECDSA P-256 over timestamp + body ------------------------------

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
_KEY_PURPOSE = b"postbode.webhooks.sendgrid.ecdsa"


def private_key(secret: str) -> ec.EllipticCurvePrivateKey:
    """The endpoint's ECDSA P-256 key, derived from its secret: each endpoint has its own key
    pair, rotating the secret rotates it, and no second secret is stored."""
    seed = hmac.new(secret_bytes(secret), _KEY_PURPOSE, hashlib.sha512).digest()
    # The scalar is in [1, n-1]: 512 bits reduced mod n-1 leave a negligible bias.
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def verification_key(secret: str) -> str:
    """The public key a receiver verifies with, as SendGrid shows it: the base64 of its DER
    SubjectPublicKeyInfo (what django-anymail's SENDGRID_TRACKING_WEBHOOK_VERIFICATION_KEY
    and SendGrid's own libraries take)."""
    der = (
        private_key(secret)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(der).decode("ascii")


def signed_headers(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The two headers of SendGrid's Signed Event Webhook: base64 of the DER ECDSA-SHA256
    signature of `{timestamp}{body}`, and the timestamp."""
    signature = private_key(secret).sign(str(timestamp).encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        SIGNATURE_HEADER: base64.b64encode(signature).decode("ascii"),
        TIMESTAMP_HEADER: str(timestamp),
    }


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # SEC 2 §2.4.2
