"""An A/B test end to end: 4,000 recipients split by a stable hash, delivered to the MX sink,
opened through the tracking pixel by people (and some scanners) with a seeded difference; the
verdict picks the right variant with the interval statsmodels computes, ending the test makes
the winner live, and 100 recipients are not enough for a verdict."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from postbode.store.engine import Store
from postbode.store.schema import deliveries, utcnow
from postbode.testing.sink import SmtpSink

PERSON = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
SCANNER = "Mozilla/5.0 (compatible; Proofpoint URL Defense)"
PIXEL = re.compile(r'src="[^"]*(/t/o/[^"]+)"')
OPEN_RATES = {"A": 0.20, "B": 0.26}


def _send(api: httpx.Client, alias: str, count: int) -> None:
    for start in range(0, count, 500):
        answer = api.post(
            "/api/v1/messages/batch",
            json={
                "message": {"from": "orders@shop.test", "template": alias, "track_opens": True},
                "recipients": [
                    {"to": f"{alias}{i}@dest.test", "model": {"n": i}}
                    for i in range(start, min(count, start + 500))
                ],
            },
        ).json()
        assert answer["failed"] == 0, answer["data"][:3]


def _start_test(api: httpx.Client, alias: str) -> int:
    api.post(
        "/api/v1/templates",
        json={"alias": alias, "subject": "News {{ n }}", "html": "<p>Hello {{ n }}</p>"},
    ).raise_for_status()
    created = api.post(
        "/api/v1/ab-tests",
        json={
            "template": alias,
            "name": "subject line",
            "variants": [
                {"name": "A", "subject": "A: news {{ n }}", "weight": 1},
                {"name": "B", "subject": "B: big news {{ n }}", "weight": 1},
            ],
        },
    )
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def _open(api: httpx.Client, received: list[Any], store: Store, seed: int) -> dict[str, int]:
    """Open each message with its variant's probability as a person would, a while after
    delivery; scanners open some too. Returns the people's opens per variant."""
    with store.write() as conn:  # people read their mail minutes later (sooner: a scanner)
        conn.execute(update(deliveries).values(last_attempt_at=utcnow() - timedelta(minutes=5)))
    rng = random.Random(seed)
    opened = {"A": 0, "B": 0}
    for r in received:
        message = r.message
        variant = str(message["Subject"])[0]
        html = message.get_body(("html",)).get_content()
        path = PIXEL.search(html)
        assert path is not None, html
        if rng.random() < 0.1:
            api.get(path.group(1), headers={"User-Agent": SCANNER}).raise_for_status()
        if rng.random() < OPEN_RATES[variant]:
            api.get(path.group(1), headers={"User-Agent": PERSON}).raise_for_status()
            opened[variant] += 1
    return opened


@pytest.mark.slow
def test_a_seeded_difference_in_opens_gives_the_right_verdict(
    api: httpx.Client, mx_sink: SmtpSink, store: Store
) -> None:
    test_id = _start_test(api, "news")
    _send(api, "news", 4000)
    received = mx_sink.wait_for_sync(4000, timeout=600)
    opened = _open(api, received, store, seed=16)

    out = api.get(f"/api/v1/ab-tests/{test_id}").json()
    by_name = {v["name"]: v for v in out["variants"]}
    assert {n: v["opened"] for n, v in by_name.items()} == opened  # scanners not counted
    assert sum(v["delivered"] for v in by_name.values()) == 4000
    assert 1800 < by_name["A"]["delivered"] < 2200
    verdict = out["verdict"]
    print(verdict["text"])
    assert verdict["decided"] and verdict["winner"] == "B"
    a, b = by_name["A"], by_name["B"]
    _, p_value = proportions_ztest([b["opened"], a["opened"]], [b["delivered"], a["delivered"]])
    low, high = confint_proportions_2indep(
        b["opened"], b["delivered"], a["opened"], a["delivered"], method="wald"
    )
    assert verdict["p_value"] == pytest.approx(p_value, rel=1e-6)
    assert verdict["interval_points"] == pytest.approx([low * 100, high * 100], abs=0.006)
    assert verdict["text"].startswith("B's open rate is higher, 95 % confidence, +")

    ended = api.post(f"/api/v1/ab-tests/{test_id}/end", json={})
    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "ended" and ended.json()["winner"] == "B"
    template = api.get("/api/v1/templates/news").json()
    assert template["live_version"] == 2 and template["subject"] == "B: big news {{ n }}"


def test_100_recipients_say_keep_testing(
    api: httpx.Client, mx_sink: SmtpSink, store: Store
) -> None:
    test_id = _start_test(api, "small")
    _send(api, "small", 100)
    received = mx_sink.wait_for_sync(100, timeout=120)
    _open(api, received, store, seed=1)
    out = api.get(f"/api/v1/ab-tests/{test_id}").json()
    assert out["verdict"]["decided"] is False
    assert out["verdict"]["text"].startswith("keep testing (n too small")
    refused = api.post(f"/api/v1/ab-tests/{test_id}/end", json={})
    assert refused.status_code == 409 and refused.json()["error"]["field"] == "winner"
