"""A batch of 500 recipients with their own models, end to end: 500 messages with distinct
renderings at the receiving MX; an invalid recipient is refused alone."""

from __future__ import annotations

import time

import httpx

from postbode.testing.sink import SmtpSink


def test_500_recipients_get_500_distinct_renderings(api: httpx.Client, mx_sink: SmtpSink) -> None:
    api.post(
        "/api/v1/templates",
        json={
            "alias": "receipt",
            "subject": "Order {{ order }}",
            "html": "<p>Dear {{ name }}, order {{ order }} comes to {{ total }}.</p>",
        },
    ).raise_for_status()
    recipients: list[dict[str, object]] = [
        {"to": f"r{i}@dest.test", "model": {"name": f"N{i}", "order": 1000 + i, "total": i}}
        for i in range(500)
    ]
    started = time.perf_counter()
    answer = api.post(
        "/api/v1/messages/batch",
        json={
            "message": {"from": "orders@shop.test", "template": "receipt"},
            "recipients": recipients,
        },
    )
    elapsed = time.perf_counter() - started
    print(f"batch of 500 answered in {elapsed * 1000:.0f} ms (loaded machine)")
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert (out["accepted"], out["failed"]) == (500, 0)
    assert len({r["id"] for r in out["data"]}) == 500

    # one bad recipient among good ones fails alone
    mixed = api.post(
        "/api/v1/messages/batch",
        json={
            "message": {"from": "orders@shop.test", "template": "receipt"},
            "recipients": [
                {"to": "x1@other.test", "model": {"order": 1}},
                {"to": "x2@other.test", "model": {"order": 2}, "surplus": True},
                {"to": "x3@other.test", "model": {"order": 3}},
            ],
        },
    ).json()
    assert [r["status"] for r in mixed["data"]] == ["accepted", "error", "accepted"]
    assert mixed["data"][1]["error"]["field"] == "recipients.1.surplus"

    received = mx_sink.wait_for_sync(500, timeout=240)
    bodies = {}
    for r in received:
        message = r.message
        (rcpt,) = r.rcpt_tos
        i = int(rcpt[1:].partition("@")[0])
        assert message["Subject"] == f"Order {1000 + i}"
        text = message.get_body(("plain",)).get_content()
        assert f"Dear N{i}, order {1000 + i} comes to {i}." in text
        bodies[rcpt] = text
    assert len(bodies) == 500 and len(set(bodies.values())) == 500
