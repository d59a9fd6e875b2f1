"""The native webhook payload: the event with its app, message and delivery."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from postbode.webhooks import formats

EVENT = {
    "id": uuid.UUID("01905d2e-0000-7000-8000-000000000001"),
    "type": "delivery.bounced",
    "created_at": datetime(2025, 3, 1, 12, 30, 5, 250000, tzinfo=UTC),
    "app": "shop",
    "app_id": 1,
    "message_id": uuid.UUID("01905d2e-0000-7000-8000-000000000002"),
    "delivery_id": uuid.UUID("01905d2e-0000-7000-8000-000000000003"),
    "recipient": "nobody@dest.test",
    "data": {"category": "user_unknown", "hard": True},
}
MESSAGE = {
    "id": EVENT["message_id"],
    "message_id_header": "<abc@shop.test>",
    "tag": "order-confirmation",
    "metadata": {"order": "42"},
    "stream": "transactional",
}


def test_native_payload() -> None:
    payload = formats.get("native")(EVENT, MESSAGE)
    assert payload == {
        "id": "01905d2e-0000-7000-8000-000000000001",
        "type": "delivery.bounced",
        "created_at": "2025-03-01T12:30:05.250000Z",
        "app": "shop",
        "message": {
            "id": "01905d2e-0000-7000-8000-000000000002",
            "message_id": "<abc@shop.test>",
            "tag": "order-confirmation",
            "metadata": {"order": "42"},
            "stream": "transactional",
        },
        "delivery": {"id": "01905d2e-0000-7000-8000-000000000003", "recipient": "nobody@dest.test"},
        "data": {"category": "user_unknown", "hard": True},
    }
    json.dumps(payload)  # plain JSON types only


def test_events_about_no_message_have_null_message_and_delivery() -> None:
    alert = {
        **EVENT,
        "type": "app.alert",
        "message_id": None,
        "delivery_id": None,
        "recipient": None,
    }
    payload = formats.get("native")(alert, None)
    assert payload["message"] is None and payload["delivery"] is None


def test_unknown_format() -> None:
    with pytest.raises(KeyError):
        formats.get("postmark-v0")
    assert "native" in formats.FORMATS


# -- render: the request an endpoint of each format receives -------------------------------

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
NOW = datetime(2025, 3, 1, 12, 31, tzinfo=UTC)


def hook(format: str, url: str = "https://hooks.test/in") -> dict[str, object]:
    return {"url": url, "format": format}


def test_render_native_is_the_signed_native_payload() -> None:
    from postbode.endpoints.signing import verify

    out = formats.render(hook("native"), [(EVENT, MESSAGE)], [SECRET], NOW)
    assert json.loads(out.body) == formats.get("native")(EVENT, MESSAGE)
    verify(SECRET, out.headers, out.body, now=NOW.timestamp())
    assert out.url == "https://hooks.test/in"


def test_render_moves_url_credentials_into_basic_auth() -> None:
    out = formats.render(
        hook("postmark", "https://us%40r:p%3Ass@hooks.test:8443/pm?x=1"),
        [(EVENT, MESSAGE)],
        [SECRET],
        NOW,
    )
    assert out.url == "https://hooks.test:8443/pm?x=1"
    import base64

    assert base64.b64decode(out.headers["authorization"].split()[1]) == b"us@r:p:ss"
    assert json.loads(out.body)["RecordType"] == "Bounce"


def test_only_sendgrid_batches() -> None:
    two = [(EVENT, MESSAGE), ({**EVENT, "id": uuid.uuid4()}, MESSAGE)]
    assert len(json.loads(formats.render(hook("sendgrid"), two, [SECRET], NOW).body)) == 2
    for name in ("native", "postmark", "mailgun"):
        with pytest.raises(ValueError):
            formats.render(hook(name), two, [SECRET], NOW)


def test_sendgrid_signature_verifies_with_the_shown_key() -> None:
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = formats.render(hook("sendgrid"), [(EVENT, MESSAGE)], [SECRET], NOW)
    key = serialization.load_der_public_key(
        base64.b64decode(formats.verification_key("sendgrid", SECRET) or "")
    )
    assert isinstance(key, ec.EllipticCurvePublicKey)
    signed = out.headers["X-Twilio-Email-Event-Webhook-Timestamp"].encode() + out.body
    key.verify(
        base64.b64decode(out.headers["X-Twilio-Email-Event-Webhook-Signature"]),
        signed,
        ec.ECDSA(hashes.SHA256()),
    )
    other = formats.verification_key("sendgrid", "whsec_" + "WFlaWFlaWFlaWFlaWFlaWFlaWFla")
    assert other != formats.verification_key("sendgrid", SECRET)


@pytest.mark.parametrize(
    ("category", "hard", "postmark_type", "sendgrid_class"),
    [
        ("user_unknown", True, "HardBounce", "Invalid Address"),
        ("mailbox_full", False, "SoftBounce", "Mailbox Unavailable"),
        ("blocked", False, "Blocked", "Reputation"),
        ("auth_failure", False, "DMARCPolicy", "Technical"),
        ("unknown", True, "HardBounce", "Unclassified"),
    ],
)
def test_bounce_categories_map_to_each_vocabulary(
    category: str, hard: bool, postmark_type: str, sendgrid_class: str
) -> None:
    bounce = {**EVENT, "data": {"category": category, "hard": hard}}
    assert formats.get("postmark")(bounce, MESSAGE)["Type"] == postmark_type
    assert formats.get("sendgrid")(bounce, MESSAGE)["bounce_classification"] == sendgrid_class
    assert formats.get("sendgrid")(bounce, MESSAGE)["type"] == ("bounce" if hard else "blocked")
    mailgun = formats.get("mailgun")(bounce, MESSAGE)["event-data"]
    assert mailgun["delivery-status"]["bounce-type"] == ("hard" if hard else "soft")
