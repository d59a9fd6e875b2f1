"""/api/v1/templates over HTTP: CRUD by alias with the app's key, versions and the live one
chosen explicitly, validation naming part and line, JSON errors, apps kept apart."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.web.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

LAYOUT = {
    "alias": "base",
    "subject": "-",
    "html": "<html><head><style>.x{font-weight:bold}</style></head>"
    "<body>{{ content }}</body></html>",
}


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        app = tenancy.create_app(store, "shop")
        c.headers["Authorization"] = f"Bearer {app.api_key}"
        yield c


def test_template_crud_versions_and_the_live_one(client: TestClient) -> None:
    assert client.post("/api/v1/templates", json=LAYOUT).status_code == 201
    created = client.post(
        "/api/v1/templates",
        json={
            "alias": "welcome",
            "subject": "Hi {{ name }}",
            "html": "<p class='x'>Hi {{ name }}</p>",
            "layout": "base",
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["live_version"], body["latest_version"], body["layout"]) == (1, 1, "base")
    again = client.post("/api/v1/templates", json={"alias": "welcome", "subject": "x", "text": "y"})
    assert again.status_code == 409
    assert again.json()["error"]["field"] == "alias"

    v2 = client.put("/api/v1/templates/welcome", json={"subject": "Hello {{ name }}", "text": "2"})
    assert v2.status_code == 200, v2.text
    assert (v2.json()["live_version"], v2.json()["latest_version"]) == (1, 2)
    assert v2.json()["subject"] == "Hi {{ name }}"  # the live one is still version 1
    live = client.post("/api/v1/templates/welcome/live", json={"version": 2})
    assert live.json()["live_version"] == 2 and live.json()["subject"] == "Hello {{ name }}"
    assert [v["version"] for v in live.json()["versions"]] == [2, 1]
    one = client.get("/api/v1/templates/welcome/versions/1").json()
    assert one["html"] == "<p class='x'>Hi {{ name }}</p>"
    assert client.post("/api/v1/templates/welcome/live", json={"version": 9}).status_code == 404

    listed = client.get("/api/v1/templates").json()["data"]
    assert [t["alias"] for t in listed] == ["base", "welcome"]
    assert client.delete("/api/v1/templates/welcome").status_code == 204
    assert client.get("/api/v1/templates/welcome").status_code == 404


def test_a_template_with_syntax_errors_is_refused_naming_part_and_line(client: TestClient) -> None:
    refused = client.post(
        "/api/v1/templates",
        json={"alias": "bad", "subject": "ok", "html": "<p>\n{% for x in %}\n</p>"},
    )
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("template_syntax", "html")
    assert error["errors"][0]["line"] == 2
    missing = client.post("/api/v1/templates", json={"alias": "x", "subject": "s"})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "html"
    no_layout = client.post(
        "/api/v1/templates", json={"alias": "y", "subject": "s", "text": "t", "layout": "nope"}
    )
    assert no_layout.status_code == 422 and no_layout.json()["error"]["field"] == "layout"
    bad_alias = client.post("/api/v1/templates", json={"alias": "a b", "subject": "s", "text": "t"})
    assert bad_alias.status_code == 422 and bad_alias.json()["error"]["field"] == "alias"


def test_validate_renders_with_a_test_model(client: TestClient) -> None:
    client.post("/api/v1/templates", json=LAYOUT)
    client.post(
        "/api/v1/templates",
        json={
            "alias": "w",
            "subject": "Hi {{ name }}",
            "html": "<p class='x'>{{ name }}</p>",
            "layout": "base",
        },
    )
    stored = client.post("/api/v1/templates/w/validate", json={"model": {"name": "<b>Al</b>"}})
    assert stored.status_code == 200, stored.text
    out = stored.json()
    assert out["valid"] and out["errors"] == []
    assert out["rendered"]["subject"] == "Hi <b>Al</b>"
    assert (
        '<p class="x" style="font-weight: bold;">&lt;b&gt;Al&lt;/b&gt;</p>'
        in (out["rendered"]["html"])
    )
    assert out["rendered"]["text"].strip() == "<b>Al</b>"

    draft = client.post(
        "/api/v1/templates/w/validate",
        json={"subject": "s", "text": "one\ntwo {{ }}\n", "model": {}},
    ).json()
    assert draft["valid"] is False
    assert draft["errors"][0]["part"] == "text" and draft["errors"][0]["line"] == 2

    hostile = client.post(
        "/api/v1/templates/w/validate",
        json={"subject": "s", "text": "{{ ''.__class__.__mro__ }}", "model": {}},
    ).json()
    assert hostile["valid"] is False
    assert "__class__" in hostile["errors"][0]["message"]
    assert client.get("/api/v1/templates").status_code == 200  # still serving


def test_another_apps_templates_are_not_seen(client: TestClient, store: Store) -> None:
    other = tenancy.create_app(store, "other")
    client.post("/api/v1/templates", json={"alias": "w", "subject": "s", "text": "t"})
    theirs = client.get("/api/v1/templates/w", headers={"Authorization": f"Bearer {other.api_key}"})
    assert theirs.status_code == 404


def test_stats_of_one_template(client: TestClient, store: Store) -> None:
    tenancy.add_domain(store, "shop", "shop.test")
    client.post("/api/v1/templates", json={"alias": "w", "subject": "s", "text": "t {{ n }}"})
    for n in range(2):
        sent = client.post(
            "/api/v1/messages",
            json={
                "from": "a@shop.test",
                "to": [f"r{n}@dest.test", "x@dest.test"],
                "template": "w",
                "model": {"n": n},
            },
        )
        assert sent.status_code == 202, sent.text
    client.post(
        "/api/v1/messages",
        json={"from": "a@shop.test", "to": ["y@dest.test"], "subject": "s", "text": "t"},
    )
    one = client.get("/api/v1/stats", params={"template": "w", "range": "1h"}).json()
    assert one["summary"]["sent"] == 4
    assert sum(one["series"]["counts"]["delivery.queued"]) == 4
    everything = client.get("/api/v1/stats", params={"range": "1h"}).json()
    assert everything["summary"]["sent"] == 5
    none = client.get("/api/v1/stats", params={"template": "other", "range": "1h"}).json()
    assert none["summary"]["sent"] == 0
    both = client.get("/api/v1/stats", params={"template": "w", "tag": "x"})
    assert both.status_code == 422 and both.json()["error"]["field"] == "tag"
