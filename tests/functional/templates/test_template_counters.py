"""The statistics counters carry the template of the mail they count: sends made from a
template through the API, delivered to and refused by the MX sink, opened and clicked through
the tracking endpoints, each counted under its template's alias (and mail from no template
under none), so GET /api/v1/stats?template= reads the counters."""

from __future__ import annotations

import email
import re
import time
from collections.abc import Callable
from datetime import timedelta
from email import policy

import httpx
from sqlalchemy import func, select, update

from postbode.store.engine import Store
from postbode.store.schema import deliveries, stat_counters, utcnow
from postbode.testing.sink import Rule, SmtpSink

PERSON = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
PIXEL = re.compile(r'src="[^"]*(/t/o/[^"]+)"')
LINK = re.compile(r'href="[^"]*(/t/c/[^"]+)"')


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def counted(store: Store) -> dict[tuple[str, str], int]:
    """{(template, event type): count} summed over every other dimension."""
    with store.read() as conn:
        rows = conn.execute(
            select(
                stat_counters.c.template,
                stat_counters.c.event_type,
                func.sum(stat_counters.c.count),
            ).group_by(stat_counters.c.template, stat_counters.c.event_type)
        ).all()
    return {(str(t), str(k)): int(n) for t, k, n in rows}


def statuses(store: Store) -> list[str]:
    with store.read() as conn:
        return sorted(str(s) for s in conn.execute(select(deliveries.c.status)).scalars())


def test_counters_carry_the_template_through_the_real_paths(
    api: httpx.Client, mx_sink: SmtpSink, store: Store
) -> None:
    api.post(
        "/api/v1/templates",
        json={
            "alias": "welcome",
            "subject": "Welcome {{ n }}",
            "html": '<p>Hello {{ n }}, <a href="https://shop.test/start">start here</a></p>',
        },
    ).raise_for_status()
    mx_sink.script.add(Rule.rcpt("gone@dest.test", "550 5.1.1 No such user here"))
    for i, to in enumerate(("ann@dest.test", "bob@dest.test", "gone@dest.test")):
        answer = api.post(
            "/api/v1/messages",
            json={
                "from": "orders@shop.test",
                "to": [to],
                "template": "welcome",
                "model": {"n": i},
                "tag": "onboarding",
                "track_opens": True,
                "track_clicks": True,
            },
        )
        assert answer.status_code == 202, answer.text
    plain = api.post(
        "/api/v1/messages",
        json={"from": "orders@shop.test", "to": ["cy@dest.test"], "subject": "Plain", "text": "x"},
    )
    assert plain.status_code == 202, plain.text
    received = mx_sink.wait_for_sync(3, timeout=60)
    wait_for(lambda: statuses(store) == ["bounced", "delivered", "delivered", "delivered"])

    # Ann reads hers a while after delivery (sooner would count as a scanner) and clicks.
    with store.write() as conn:
        conn.execute(update(deliveries).values(last_attempt_at=utcnow() - timedelta(minutes=5)))
    (ann,) = [r for r in received if "ann@dest.test" in r.rcpt_tos]
    message = email.message_from_bytes(ann.data, policy=policy.default)
    body = message.get_body(("html",))
    assert body is not None
    html = body.get_content()
    pixel, link = PIXEL.search(html), LINK.search(html)
    assert pixel is not None and link is not None, html
    api.get(pixel.group(1), headers={"User-Agent": PERSON}).raise_for_status()
    assert api.get(link.group(1), headers={"User-Agent": PERSON}).status_code in (302, 303, 307)
    wait_for(lambda: counted(store).get(("welcome", "message.clicked"), 0) == 1)

    figures = counted(store)
    assert figures[("welcome", "message.received")] == 3
    assert figures[("welcome", "delivery.queued")] == 3  # sent
    assert figures[("welcome", "delivery.delivered")] == 2
    assert figures[("welcome", "delivery.bounced")] == 1
    assert figures[("welcome", "message.opened")] == 1
    assert figures[("welcome", "message.clicked")] == 1
    # The plain message counts under no template, and nothing else does.
    assert figures[("", "delivery.delivered")] == 1
    assert {k for t, k in figures if t == ""} == {
        "message.received",
        "delivery.queued",
        "delivery.delivered",
    }

    # What the API answers for the template is those counters.
    summary = api.get("/api/v1/stats", params={"template": "welcome", "range": "24h"}).json()[
        "summary"
    ]
    assert summary["sent"] == 3
    assert summary["totals"]["delivery.delivered"] == 2
    assert summary["totals"]["delivery.bounced"] == 1
    assert summary["totals"]["message.opened"] == 1
    # The tag's figures count the same mail: they sum over the template dimension.
    tagged = api.get("/api/v1/stats", params={"tag": "onboarding", "range": "24h"}).json()
    assert tagged["summary"]["totals"] == summary["totals"]
