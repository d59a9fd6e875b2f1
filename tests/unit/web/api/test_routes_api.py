"""/api/v1/routes and /api/v1/inbound over HTTP: route CRUD with the app's key, the inbound
log with search, a message's parsed view and attempts, release and replay, JSON errors."""

from __future__ import annotations

import uuid
import warnings
import zlib
from collections.abc import Iterator

import pytest
from sqlalchemy import insert, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import inbound_attempts, inbound_messages, new_id, utcnow
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

RAW = (
    b"From: Alice <alice@sender.test>\r\nTo: support+t-7@in.shop.test\r\n"
    b"Subject: Lamp broken\r\n\r\nIt flickers.\r\n\r\nOn Mon, Shop wrote:\r\n> Hi\r\n"
)


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store)) as c:
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "in.shop.test", inbound=True)
        c.headers["Authorization"] = f"Bearer {app.api_key}"
        c.app_id = app.app_id  # type: ignore[attr-defined]
        yield c


def stored(
    store: Store, app_id: int, route_id: int | None, status: str, **values: object
) -> uuid.UUID:
    inbound_id = new_id()
    now = utcnow()
    with store.write() as conn:
        conn.execute(
            insert(inbound_messages).values(
                **{
                    "subject": "Lamp broken",
                    **values,
                },
                id=inbound_id,
                app_id=app_id,
                route_id=route_id,
                action="hold" if status == "held" else "post",
                mail_from="bounces@sender.test",
                rcpt_to="support+t-7@in.shop.test",
                mailbox_hash="t-7",
                from_header="Alice <alice@sender.test>",
                size=len(RAW),
                raw=zlib.compress(RAW),
                status=status,
                attempts=0,
                next_attempt_at=now,
                received_at=now,
                queued_at=now,
            )
        )
    return inbound_id


def test_route_crud_with_the_apps_key(client: TestClient) -> None:
    created = client.post(
        "/api/v1/routes", json={"match": "Support@in.shop.test", "url": "https://app.test/in"}
    )
    assert created.status_code == 201, created.text
    route = created.json()
    assert route["secret"].startswith("whsec_")
    assert (route["match"], route["action"], route["format"]) == (
        "support@in.shop.test",
        "post",
        "native",
    )
    path = f"/api/v1/routes/{route['id']}"
    assert "secret" not in client.get(path).json()
    assert [r["match"] for r in client.get("/api/v1/routes").json()["data"]] == [
        "support@in.shop.test"
    ]
    changed = client.patch(path, json={"action": "hold", "format": "postmark"}).json()
    assert (changed["action"], changed["format"], changed["url"]) == (
        "hold",
        "postmark",
        "https://app.test/in",
    )
    assert client.delete(path).status_code == 204
    assert client.get(path).json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"match": "support@in.shop.test"}, 422, "url"),
        ({"match": "support@elsewhere.test", "url": "https://a.test/"}, 422, "match"),
        ({"match": "sup*@in.shop.test", "url": "https://a.test/"}, 422, "match"),
        ({"match": "a@in.shop.test", "url": "https://a.test/", "action": "drop"}, 422, "action"),
        ({"match": "a@in.shop.test", "url": "gopher://a.test/"}, 422, "url"),
        ({"match": "a@in.shop.test", "url": "http://127.0.0.1:8025/"}, 422, "url"),
        ({"match": "a@in.shop.test", "url": "http://metadata.internal/"}, 422, "url"),
    ],
)
def test_bad_routes_get_json_errors_naming_the_field(
    client: TestClient, body: dict[str, str], status: int, field: str
) -> None:
    answer = client.post("/api/v1/routes", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field


def test_routes_of_another_app_are_not_found(client: TestClient, store: Store) -> None:
    other = tenancy.create_app(store, "other")
    tenancy.add_domain(store, "other", "in.other.test", inbound=True)
    answer = client.post(
        "/api/v1/routes", json={"match": "a@in.other.test", "url": "https://a.test/"}
    )
    assert answer.status_code == 422
    theirs = client.post(
        "/api/v1/routes",
        json={"match": "a@in.other.test", "url": "https://a.test/"},
        headers={"Authorization": f"Bearer {other.api_key}"},
    ).json()
    assert client.get(f"/api/v1/routes/{theirs['id']}").status_code == 404
    assert client.delete(f"/api/v1/routes/{theirs['id']}").status_code == 404
    assert client.get("/api/v1/routes", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_inbound_log_message_view_release_and_replay(client: TestClient, store: Store) -> None:
    app_id = client.app_id  # type: ignore[attr-defined]
    route = client.post(
        "/api/v1/routes",
        json={"match": "support@in.shop.test", "url": "https://app.test/in", "action": "hold"},
    ).json()
    held = stored(store, app_id, route["id"], "held")
    done = stored(store, app_id, route["id"], "delivered", subject="Invoice")
    with store.write() as conn:
        conn.execute(
            insert(inbound_attempts).values(
                inbound_id=done,
                started_at=utcnow(),
                duration_ms=12,
                url="https://app.test/in",
                status_code=200,
                response_body="thanks",
            )
        )
    listed = client.get("/api/v1/inbound").json()
    assert [m["id"] for m in listed["data"]] == [str(done), str(held)]
    assert [m["id"] for m in client.get("/api/v1/inbound?status=held").json()["data"]] == [
        str(held)
    ]
    assert [m["id"] for m in client.get("/api/v1/inbound?q=INVOICE").json()["data"]] == [str(done)]
    page = client.get("/api/v1/inbound?limit=1").json()
    assert page["next_cursor"] == str(done)
    assert client.get(f"/api/v1/inbound?limit=1&cursor={page['next_cursor']}").json()["data"][0][
        "id"
    ] == str(held)

    detail = client.get(f"/api/v1/inbound/{done}").json()
    assert detail["match"] == "support@in.shop.test" and detail["mailbox_hash"] == "t-7"
    assert detail["parsed"]["stripped_text_reply"] == "It flickers."
    assert detail["parsed"]["from"] == {"email": "alice@sender.test", "name": "Alice"}
    assert [(a["status_code"], a["response_body"]) for a in detail["attempt_log"]] == [
        (200, "thanks")
    ]
    raw = client.get(f"/api/v1/inbound/{done}/raw")
    assert raw.headers["content-type"] == "message/rfc822" and raw.content == RAW

    assert client.post(f"/api/v1/inbound/{done}/release").status_code == 409
    released = client.post(f"/api/v1/inbound/{held}/release")
    assert released.status_code == 200 and released.json()["status"] == "pending"
    replayed = client.post(f"/api/v1/inbound/{done}/replay").json()
    assert replayed["status"] == "pending"
    assert client.post(f"/api/v1/inbound/{done}/replay").status_code == 409
    with store.read() as conn:
        actions = dict(conn.execute(select(inbound_messages.c.id, inbound_messages.c.action)).all())
    assert actions[held] == "post"  # released: it is posted, not held again
    assert client.get(f"/api/v1/inbound/{new_id()}").json()["error"]["code"] == "not_found"
    assert client.get("/api/v1/inbound?status=lost").status_code == 422


def test_release_needs_a_url(client: TestClient, store: Store) -> None:
    route = client.post(
        "/api/v1/routes", json={"match": "keep@in.shop.test", "action": "hold"}
    ).json()
    held = stored(store, client.app_id, route["id"], "held")  # type: ignore[attr-defined]
    answer = client.post(f"/api/v1/inbound/{held}/release")
    assert answer.status_code == 409 and "no URL" in answer.json()["error"]["message"]
