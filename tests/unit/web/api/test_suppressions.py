"""/api/v1/suppressions: list with keyset pages, add, delete, CSV import and export, per app."""

from __future__ import annotations

import contextlib
import csv
import io
import warnings
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi import FastAPI

from postbode import tenancy
from postbode.bounces.suppression import suppress
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.web.api import suppressions as suppressions_api
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@contextlib.contextmanager
def serve(settings: Settings, store: Store, api_key: str) -> Iterator[TestClient]:
    app: FastAPI = create_app(settings, store)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {api_key}"
        try:
            yield client
        finally:
            assert client.portal is not None
            client.portal.call(app.state.acceptor.close)


@pytest.fixture
def shop(store: Store) -> tenancy.NewApp:
    return tenancy.create_app(store, "shop")


@pytest.fixture
def client(settings: Settings, store: Store, shop: tenancy.NewApp) -> Iterator[TestClient]:
    with serve(settings, store, shop.api_key) as c:
        yield c


def add(client: TestClient, *items: dict[str, str]) -> int:
    response = client.post("/api/v1/suppressions", json={"suppressions": list(items)})
    assert response.status_code == 200, response.text
    return int(response.json()["created"])


def emails(client: TestClient, **params: str) -> list[str]:
    response = client.get("/api/v1/suppressions", params=params)
    assert response.status_code == 200, response.text
    return [e["email"] for e in response.json()["data"]]


def test_add_one_or_many_then_list_and_filter(client: TestClient) -> None:
    assert add(client, {"email": "Alice@Dest.test"}) == 1
    assert (
        add(
            client,
            {"email": "bob@dest.test", "reason": "complaint", "stream": "broadcast"},
            {"email": "carol@dest.test", "stream": "transactional"},
            {"email": "alice@dest.test"},  # already there: not created again
        )
        == 2
    )
    body = client.get("/api/v1/suppressions").json()
    assert body["next_cursor"] is None
    first = body["data"][0]
    assert first["email"] == "alice@dest.test" and first["reason"] == "manual"
    assert first["stream"] == "all" and first["source"] == "manual"
    assert first["expires_at"] is None and first["created_at"]
    assert emails(client, stream="broadcast") == ["bob@dest.test"]
    assert emails(client, reason="complaint") == ["bob@dest.test"]
    assert emails(client, email="CAROL@dest.test") == ["carol@dest.test"]


def test_pages_are_keyset_pages(client: TestClient) -> None:
    add(client, *({"email": f"u{i:02}@dest.test"} for i in range(25)))
    seen: list[str] = []
    params = {"limit": "10"}
    while True:
        body = client.get("/api/v1/suppressions", params=params).json()
        seen += [e["email"] for e in body["data"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert seen == [f"u{i:02}@dest.test" for i in range(25)]
    bad = client.get("/api/v1/suppressions", params={"cursor": "abc"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"


def test_bad_entries_are_refused_naming_the_field(client: TestClient) -> None:
    response = client.post(
        "/api/v1/suppressions",
        json={"suppressions": [{"email": "ok@dest.test"}, {"email": "not an address"}]},
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "suppressions.1.email"
    response = client.post(
        "/api/v1/suppressions", json={"suppressions": [{"email": "a@dest.test", "stream": "x"}]}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "suppressions.0.stream"
    assert emails(client) == []  # nothing of a refused request was kept


def test_each_app_sees_and_changes_only_its_own_list(
    settings: Settings, store: Store, client: TestClient
) -> None:
    other = tenancy.create_app(store, "other")
    add(client, {"email": "shared@dest.test"})
    with serve(settings, store, other.api_key) as theirs:
        assert emails(theirs) == []
        assert theirs.delete("/api/v1/suppressions/shared@dest.test").status_code == 404
        assert theirs.get("/api/v1/suppressions/export").text.count("\n") == 1
    assert emails(client) == ["shared@dest.test"]
    assert (
        client.get("/api/v1/suppressions", headers={"Authorization": "Bearer x"}).status_code == 401
    )


def test_delete_one_stream_or_every_stream(client: TestClient) -> None:
    add(
        client,
        {"email": "a@dest.test", "stream": "broadcast"},
        {"email": "a@dest.test", "stream": "transactional"},
        {"email": "a@dest.test"},
    )
    response = client.delete("/api/v1/suppressions/A@dest.test", params={"stream": "broadcast"})
    assert response.status_code == 200 and response.json() == {"deleted": 1}
    assert client.delete("/api/v1/suppressions/a@dest.test").json() == {"deleted": 2}
    missing = client.delete("/api/v1/suppressions/a@dest.test")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_expired_entries_are_left_out_everywhere(
    client: TestClient, store: Store, shop: tenancy.NewApp
) -> None:
    with store.write() as conn:
        suppress(
            conn,
            shop.app_id,
            "past@dest.test",
            reason="mailbox_full",
            source="bounce",
            expires_at=utcnow() - timedelta(minutes=1),
        )
        suppress(
            conn,
            shop.app_id,
            "soon@dest.test",
            reason="mailbox_full",
            source="bounce",
            expires_at=utcnow() + timedelta(days=1),
        )
    assert emails(client) == ["soon@dest.test"]
    export = client.get("/api/v1/suppressions/export").text
    assert "soon@dest.test" in export and "past@dest.test" not in export


def test_csv_import_reports_bad_rows_by_line(client: TestClient) -> None:
    body = (
        "email,reason,stream\n"
        "alice@dest.test,manual,all\n"
        "nobody,manual,all\n"
        "bob@dest.test,complaint,broadcast\n"
        "carol@dest.test,manual,weekly\n"
    )
    response = client.post(
        "/api/v1/suppressions/import", content=body, headers={"Content-Type": "text/csv"}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["created"] == 2 and result["rows"] == 4
    assert [(e["line"], e["field"]) for e in result["errors"]] == [(3, "email"), (5, "stream")]
    assert sorted(emails(client)) == ["alice@dest.test", "bob@dest.test"]


def test_csv_import_refuses_what_is_no_csv_file(client: TestClient) -> None:
    url = "/api/v1/suppressions/import"
    wrong_type = client.post(
        url, content="email\na@dest.test\n", headers={"Content-Type": "application/json"}
    )
    assert wrong_type.status_code == 415
    no_header = client.post(url, content="a@dest.test\n", headers={"Content-Type": "text/csv"})
    assert no_header.status_code == 422 and no_header.json()["error"]["code"] == "invalid_csv"
    latin1 = client.post(
        url,
        content="email\nj\xf6rg@dest.test\n".encode("latin-1"),
        headers={"Content-Type": "text/csv"},
    )
    assert latin1.status_code == 422


def test_csv_import_over_the_size_cap_is_413(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suppressions_api, "MAX_IMPORT_BYTES", 100)
    body = "email\n" + "".join(f"user{i}@dest.test\n" for i in range(20))
    response = client.post(
        "/api/v1/suppressions/import", content=body, headers={"Content-Type": "text/csv"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


def test_csv_export_streams_chunks_and_round_trips(
    settings: Settings, store: Store, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suppressions_api, "EXPORT_CHUNK", 4)  # several keyset chunks
    add(client, *({"email": f"u{i:02}@dest.test", "reason": "manual"} for i in range(10)))
    add(client, {"email": "news@dest.test", "reason": "complaint", "stream": "broadcast"})
    with store.write() as conn:
        suppress(
            conn,
            tenancy.app_by_name(conn, "shop")["id"],
            "full@dest.test",
            reason="mailbox_full",
            source="bounce",
            expires_at=utcnow() + timedelta(days=2),
        )
    response = client.get("/api/v1/suppressions/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 12 and {r["source"] for r in rows} == {"manual", "bounce"}
    only_broadcast = client.get("/api/v1/suppressions/export", params={"stream": "broadcast"})
    assert [r["email"] for r in csv.DictReader(io.StringIO(only_broadcast.text))] == [
        "news@dest.test"
    ]

    # The export imports unchanged into another app, and lists the same entries there.
    other = tenancy.create_app(store, "other")
    with serve(settings, store, other.api_key) as theirs:
        imported = theirs.post(
            "/api/v1/suppressions/import",
            content=response.content,
            headers={"Content-Type": "text/csv; charset=utf-8"},
        ).json()
        assert imported["created"] == 12 and imported["errors"] == []
        again = list(csv.DictReader(io.StringIO(theirs.get("/api/v1/suppressions/export").text)))

    def key(r: dict[str, str]) -> tuple[str, str, str, str]:
        return r["email"], r["reason"], r["stream"], r["expires_at"]

    assert sorted(map(key, again)) == sorted(map(key, rows))
    assert {r["source"] for r in again} == {"import"}


def test_suppressions_are_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"get", "post"} <= set(paths["/api/v1/suppressions"])
    assert "delete" in paths["/api/v1/suppressions/{email}"]
    assert "text/csv" in paths["/api/v1/suppressions/import"]["post"]["requestBody"]["content"]
    assert "get" in paths["/api/v1/suppressions/export"]
