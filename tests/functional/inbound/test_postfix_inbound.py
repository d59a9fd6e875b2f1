"""A real Postfix relays a reply with a 5 MB attachment to Postbode as the MX of in.shop.test;
the app's endpoint gets it parsed, signed and verified."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator

import pytest
from standardwebhooks.webhooks import Webhook

from postbode import tenancy
from postbode.store.engine import Store
from postbode.testing.postfix import Postfix, relay_config, require_postfix

from .conftest import Endpoint, InboundPostbode
from .test_inbound import REPLY, add_route, reply_message, wait_status

POSTFIX_HOSTNAME = "mta.sender.test"
ATTACHMENT_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def postfix_instance() -> Iterator[Postfix]:
    require_postfix()  # CI installs Postfix: a missing one is an error, not a skip
    with Postfix(hostname=POSTFIX_HOSTNAME) as instance:
        yield instance


@pytest.fixture
def postfix(postfix_instance: Postfix, postbode: InboundPostbode) -> Iterator[Postfix]:
    """Postfix sending everything to Postbode's listener, as it would to in.shop.test's MX:
    no AUTH, STARTTLS if offered (Postbode's certificate is self-signed)."""
    postfix_instance.purge()
    postfix_instance.configure(
        relay_config(postbode.host, postbode.port, tls="may")
        | {"message_size_limit": str(4 * ATTACHMENT_BYTES)},
        replace=True,
    )
    yield postfix_instance
    postfix_instance.purge()
    postfix_instance.reload()


def test_postfix_relays_a_reply_with_a_5_mb_attachment_to_the_app(
    postfix: Postfix,
    postbode: InboundPostbode,
    store: Store,
    shop: tenancy.NewApp,
    endpoint: Endpoint,
    sender_key: str,
) -> None:
    route = add_route(store, shop, "support@in.shop.test", url=endpoint.url)
    postbode.refresh()
    attachment = os.urandom(ATTACHMENT_BYTES)
    raw = reply_message(attachment, key=sender_key)
    since = postfix.log_position()
    postfix.sendmail("bounces@sender.test", ["support+order-42@in.shop.test"], raw)

    request = endpoint.wait_for(1, timeout=120)[0]
    postfix.wait_queue_empty()
    payload = Webhook(route["secret"]).verify(request.body, request.headers)
    assert payload["mailbox_hash"] == "order-42"
    assert payload["envelope"]["rcpt_to"] == "support+order-42@in.shop.test"
    assert payload["envelope"]["helo"] == POSTFIX_HOSTNAME
    assert payload["stripped_text_reply"] == "Yes, please ship it to the new address."
    assert payload["text"] == REPLY
    assert payload["html"] == "<p>Yes, please ship it to the <b>new</b> address.</p>\n"
    [pdf] = payload["attachments"]
    content = base64.b64decode(pdf["content"])
    assert len(content) == pdf["size"] == ATTACHMENT_BYTES
    assert hashlib.sha256(content).hexdigest() == hashlib.sha256(attachment).hexdigest()
    assert pdf["sha256"] == hashlib.sha256(attachment).hexdigest()
    verification = payload["verification"]
    assert verification["spf"]["result"] == "pass"
    assert [d["result"] for d in verification["dkim"]] == ["pass"]
    assert verification["dmarc"]["result"] == "pass"
    # Postfix's own Received line is in the headers, below Postbode's
    received = [h["value"] for h in payload["headers"] if h["name"].lower() == "received"]
    assert received[0].startswith(f"from {POSTFIX_HOSTNAME} (127.0.0.1)")
    assert f"by {POSTFIX_HOSTNAME} (Postfix" in received[1]

    [row] = wait_status(store, "delivered")
    log = postfix.maillog(since)
    assert re.search(
        rf"to=<support\+order-42@in\.shop\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
        rf"{postbode.port}, .*status=sent \(250 2\.0\.0 Ok: queued as {row.id}\)",
        log,
    ), log
