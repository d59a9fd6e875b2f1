"""Numbers and instants out of range are a 422 naming the field, never a 500."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.factories import make_app
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def api(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {make_app(store).api_key}"
        yield client


@pytest.mark.parametrize("action", ["cancel", "retry", "release"])
@pytest.mark.parametrize("seconds", [1e12, 1e308, -1])
def test_bulk_actions_bound_the_age(api: TestClient, action: str, seconds: float) -> None:
    answer = api.post(f"/api/v1/deliveries/{action}", json={"older_than_seconds": seconds})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "older_than_seconds"


@pytest.mark.parametrize("webhook_id", [2**31, 2**63, 10**30, 0])
def test_row_ids_out_of_range_are_refused(api: TestClient, webhook_id: int) -> None:
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/requests")):
        answer = api.request(method, f"/api/v1/webhooks/{webhook_id}{path}")
        assert answer.status_code == 422, answer.text


@pytest.mark.parametrize(
    "path",
    ["/api/v1/messages", "/api/v1/events", "/api/v1/stats"],
)
@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"])
def test_instants_out_of_range_are_refused(api: TestClient, path: str, since: str) -> None:
    answer = api.get(path, params={"since": since})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "since"


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/stats/compare?a=x%00&b=y",
        "/api/v1/messages?tag=%00",
        "/api/v1/suppressions?email=a%00@b.test",
        "/api/v1/events?recipient=%00",
    ],
)
def test_nul_in_a_url_is_refused(api: TestClient, url: str) -> None:
    answer = api.get(url)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/suppressions", {"suppressions": [{"email": "a\u0000@b.test"}]}),
        ("/api/v1/suppressions", {"suppressions": [{"email": "a@b.test", "reason": "\u0000"}]}),
        ("/api/v1/deliveries/cancel", {"tag": "\u0000"}),
        ("/api/v1/deliveries/cancel", {"recipient_domain": "a\u0000.test"}),
        ("/api/v1/webhooks", {"url": "https://hooks.example.com/\u0000"}),
    ],
)
def test_nul_in_a_json_body_is_refused(api: TestClient, path: str, body: object) -> None:
    answer = api.post(path, json=body)
    assert answer.status_code == 422, answer.text
