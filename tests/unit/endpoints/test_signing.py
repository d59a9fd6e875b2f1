"""Webhook signatures: Standard Webhooks' own library verifies what we sign, rotations included."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postbode.endpoints import signing
from postbode.endpoints.signing import SignatureError

BODY = b'{"id":"0190","type":"delivery.delivered","data":{"reply":"250 caf\xc3\xa9"}}'


def test_a_secret_is_whsec_and_24_random_bytes() -> None:
    one, two = signing.generate_secret(), signing.generate_secret()
    assert one.startswith("whsec_") and one != two
    assert len(base64.b64decode(one.removeprefix("whsec_"), validate=True)) == 24
    assert signing.secret_bytes(one) == base64.b64decode(one[6:])


def test_standardwebhooks_verifies_our_signature() -> None:
    secret = signing.generate_secret()
    headers = signing.signed_headers([secret], "01905d2e-aaaa", BODY)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers)["type"] == "delivery.delivered"


def test_same_signature_as_the_reference_implementation() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    ts = 1614265330
    expected = Webhook(secret).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(ts, UTC), BODY.decode()
    )
    assert signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", ts, BODY) == expected


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: ({**h, "webhook-id": "other"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
    ],
    ids=["body", "id", "timestamp"],
)
def test_any_change_breaks_the_signature(tamper) -> None:
    secret = signing.generate_secret()
    headers, body = tamper(signing.signed_headers([secret], "evt-1", BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)
    with pytest.raises(SignatureError):
        signing.verify(secret, headers, body)


def test_another_secret_does_not_verify() -> None:
    headers = signing.signed_headers([signing.generate_secret()], "evt-1", BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.generate_secret()).verify(BODY, headers)


def test_during_rotation_both_secrets_verify() -> None:
    new, old = signing.generate_secret(), signing.generate_secret()
    headers = signing.signed_headers([new, old], "evt-1", BODY)
    first, second = headers["webhook-signature"].split(" ")
    assert first.startswith("v1,") and second.startswith("v1,")
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    signing.verify(old, headers, BODY)


def test_old_timestamps_are_refused() -> None:
    secret = signing.generate_secret()
    headers = signing.signed_headers([secret], "evt-1", BODY, timestamp=int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, headers)
    with pytest.raises(SignatureError, match="tolerance"):
        signing.verify(secret, headers, BODY)


def test_bad_secrets_and_missing_headers() -> None:
    with pytest.raises(SignatureError):
        signing.secret_bytes("whsec_not base64!")
    with pytest.raises(SignatureError):
        signing.secret_bytes("whsec_")
    with pytest.raises(SignatureError):
        signing.signed_headers([], "evt-1", BODY)
    with pytest.raises(SignatureError, match="missing"):
        signing.verify(signing.generate_secret(), {}, BODY)
