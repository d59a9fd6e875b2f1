"""POST /api/v1/messages answered before FastAPI's router (the ASGI app processes serve) gives
the answers the FastAPI route gives, case by case."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store
from postbode.web.api import messages as api
from postbode.web.app import create_app, serving_app

from .test_messages import BODY, JSON, MINIMAL, _Unavailable, count, make_app, raw_message
from .test_messages import _fast_tenancy as _fast_tenancy

# The headers an answer's meaning may depend on (Date and Server come from the HTTP server).
_COMPARED = ("content-type", "www-authenticate", "retry-after", "idempotent-replayed", "location")


@pytest.fixture
def sqlite_settings(sqlite_store: Store, tmp_path: Path) -> Settings:
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    return Settings(data_dir=tmp_path, database_url=url, secret_key="test-secret-key")


@pytest.fixture
def shop(sqlite_store: Store) -> tenancy.NewApp:
    return make_app(sqlite_store, "shop", "shop.test")


class Both:
    """The FastAPI route and the fast path of one store, side by side."""

    def __init__(self, route: TestClient, fast: TestClient, taken: list[int]) -> None:
        self.route, self.fast, self._taken = route, fast, taken

    def post(self, **kwargs: Any) -> tuple[Any, Any]:
        before = len(self._taken)
        r = self.route.post("/api/v1/messages", **kwargs)
        assert len(self._taken) == before, "the FastAPI app took the fast path"
        f = self.fast.post("/api/v1/messages", **kwargs)
        assert len(self._taken) == before + 1, "the serving app did not take the fast path"
        return r, f

    def same(self, **kwargs: Any) -> tuple[Any, Any]:
        """Post to both; assert the answers are the same (ids aside) and return them."""
        r, f = self.post(**kwargs)
        assert (r.status_code, _headers(r)) == (f.status_code, _headers(f)), (r.text, f.text)
        assert _anonymous(r.json()) == _anonymous(f.json())
        if r.status_code != 202:
            assert r.content == f.content  # byte for byte, messages included
        return r, f


def _headers(response: Any) -> dict[str, str]:
    return {k: response.headers[k] for k in _COMPARED if k in response.headers}


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _anonymous(data: Any) -> Any:
    """The answer with ids and Message-IDs replaced by their kind."""
    if isinstance(data, dict):
        return {k: "<msgid>" if k == "message_id" else _anonymous(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_anonymous(v) for v in data]
    if isinstance(data, str) and _UUID.match(data):
        return "<uuid>"
    return data


@contextlib.contextmanager
def both(
    settings: Settings,
    store: Store,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    acceptor_class: type[Acceptor] = Acceptor,
) -> Iterator[Both]:
    taken: list[int] = []
    real = api._fast_send

    async def counted(request: Any) -> Any:
        taken.append(1)
        return await real(request)

    monkeypatch.setattr(api, "_fast_send", counted)
    allow = settings.allow_unverified_domains
    route_acceptor = acceptor_class(store, settings.smtp_hostname, allow_unverified=allow)
    fast_acceptor = acceptor_class(store, settings.smtp_hostname, allow_unverified=allow)
    with (
        TestClient(create_app(settings, store, route_acceptor)) as route,
        TestClient(serving_app(settings, store, fast_acceptor)) as fast,
    ):
        for client in (route, fast):
            client.headers["Authorization"] = f"Bearer {api_key}"
        try:
            yield Both(route, fast, taken)
        finally:
            assert route.portal is not None and fast.portal is not None
            route.portal.call(route_acceptor.close)
            fast.portal.call(fast_acceptor.close)


def _json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "headers": JSON}


def _with(**change: Any) -> dict[str, Any]:
    return {k: v for k, v in {**BODY, **change}.items() if v is not None}


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("invalid JSON", {"content": b'{"from": ', "headers": JSON}),
    ("UTF-16 BOM", {"content": b"\xff\xfe", "headers": JSON}),
    ("not UTF-8", {"content": b"\x80abc", "headers": JSON}),
    ("not UTF-8 inside", {"content": b'{"subject": "\x80"}', "headers": JSON}),
    ("a list", {"content": b"[1, 2]", "headers": JSON}),
    ("a string", {"content": b'"a string"', "headers": JSON}),
    ("null", {"content": b"null", "headers": JSON}),
    ("empty", {"content": b"", "headers": JSON}),
    (
        "text/plain",
        {"content": json.dumps(MINIMAL).encode(), "headers": {"Content-Type": "text/plain"}},
    ),
    ("no content type", {"content": json.dumps(MINIMAL).encode()}),
    ("missing from", _json(_with(**{"from": None}))),
    ("bad to", _json(_with(to=["alice@dest.test", "not an address"]))),
    ("unknown field", _json(_with(attachment=[]))),
    ("subject CRLF", _json(_with(subject="Hi\r\nBcc: x@evil.test"))),
    ("subject encoded CRLF", _json(_with(subject="=?utf-8?q?a=0D=0ABcc:_x@evil.test?="))),
    ("reserved header", _json(_with(headers={"Message-ID": "<x@y>"}))),
    ("bad header name", _json(_with(headers={"X Bad": "1"}))),
    ("bad base64", _json(_with(attachments=[{"filename": "a", "content": "no!"}]))),
    ("no recipients", _json({**MINIMAL, "to": []})),
    ("no content", _json({k: v for k, v in MINIMAL.items() if k != "text"})),
    ("foreign sender", _json({**MINIMAL, "from": "x@unknown.test"})),
    ("metadata", _json(_with(metadata={"k": 1}))),
    ("several errors", _json({"from": "bad", "to": "x", "subject": ""})),
    ("empty key", {**_json(MINIMAL), "headers": {**JSON, "Idempotency-Key": ""}}),
    ("long key", {**_json(MINIMAL), "headers": {**JSON, "Idempotency-Key": "k" * 256}}),
    ("key with space", {**_json(MINIMAL), "headers": {**JSON, "Idempotency-Key": "a b"}}),
    ("key and body", {"content": b"{}", "headers": {**JSON, "Idempotency-Key": "a b"}}),
    ("key and JSON", {"content": b"{", "headers": {**JSON, "Idempotency-Key": "a b"}}),
]


@pytest.mark.parametrize("request_", [c[1] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refusals_are_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
    request_: dict[str, Any],
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        r, _ = paths.same(**request_)
    assert r.status_code in (400, 422) and "error" in r.json()
    assert count(sqlite_store, api.messages) == 0


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("minimal", _json(MINIMAL)),
    ("everything", _json(BODY)),
    (
        "charset parameter",
        {**_json(MINIMAL), "headers": {"Content-Type": "application/json; charset=utf-8"}},
    ),
    ("+json", {**_json(MINIMAL), "headers": {"Content-Type": "application/vnd.postbode+json"}}),
    ("html only", _json({**MINIMAL, "text": None, "html": "<p>" + "x" * 200 + "</p>"})),
    ("bcc only", _json({**MINIMAL, "to": None, "bcc": ["a@dest.test", "A@dest.test"]})),
    ("unicode", _json({**MINIMAL, "subject": "Grüße", "to": ["Zoë <zoë@dest.test>"], "text": "ü"})),
    ("guessed type", _json({**MINIMAL, "attachments": [{"filename": "a.txt", "content": "QUJD"}]})),
]


@pytest.mark.parametrize("request_", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_acceptances_are_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
    request_: dict[str, Any],
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        r, f = paths.same(**request_)
    assert r.status_code == 202, r.text
    # The stored messages are the same but for trace, Date, Message-ID and MIME boundaries.
    route_raw = raw_message(sqlite_store, r.json()["id"])
    fast_raw = raw_message(sqlite_store, f.json()["id"])
    assert _comparable(route_raw) == _comparable(fast_raw)


def _comparable(raw: bytes) -> bytes:
    raw = re.sub(rb"(?m)^(Received|Date|Message-ID): .*\r\n([ \t].*\r\n)*", b"", raw)
    return re.sub(rb"===============\d+==", b"=boundary=", raw)


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer pb_nope_nope", "Basic dXNlcjpwYXNz", "pb_x"]
)
def test_unauthorised_is_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
    authorization: str | None,
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        for client in (paths.route, paths.fast):
            del client.headers["Authorization"]
            if authorization is not None:
                client.headers["Authorization"] = authorization
        r, _ = paths.same(**_json(MINIMAL))
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        # Checked before the body is read: nothing parsed, no 413.
        paths.same(content=b"{not json", headers=JSON)
        paths.same(content=b"x" * 60_000_000, headers=JSON)


def test_a_revoked_key_is_refused_at_once(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        paths.same(**_json(MINIMAL))  # the key is now in this process's cache
        (credential,) = [
            c for c in tenancy.list_credentials(sqlite_store, "shop") if c["kind"] == "api"
        ]
        tenancy.revoke_credential(sqlite_store, credential["id"])
        r, _ = paths.same(**_json(MINIMAL))
    assert r.status_code == 401


def test_oversize_is_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = sqlite_settings.model_copy(
        update={"smtp_max_message_size": 10_000, "smtp_max_recipients": 3}
    )

    def att(n: int) -> dict[str, str]:
        return {"filename": "a.bin", "content": base64.b64encode(b"x" * n).decode()}

    with both(small, sqlite_store, shop.api_key, monkeypatch) as paths:
        for body, status in [
            ({**MINIMAL, "attachments": [att(8000)]}, 422),
            ({**MINIMAL, "attachments": [att(4000)] * 2}, 422),
            ({**MINIMAL, "text": "x" * 10_000}, 422),
            (
                {**MINIMAL, "to": ["a@dest.test", "b@dest.test"], "cc": ["c@d.test", "d@d.test"]},
                422,
            ),
            ({**MINIMAL, "text": "x" * 1_100_000}, 413),
            ({**MINIMAL, "attachments": [att(5000)]}, 202),
        ]:
            r, _ = paths.same(**_json(body))
            assert r.status_code == status, r.text

        # A body without Content-Length is cut off as it streams in.
        def chunks() -> Iterator[bytes]:
            yield b'{"text": "'
            for _ in range(30):
                yield b"x" * 100_000
            yield b'"}'

        r = paths.route.post("/api/v1/messages", content=chunks(), headers=JSON)
        f = paths.fast.post("/api/v1/messages", content=chunks(), headers=JSON)
        assert r.status_code == f.status_code == 413 and r.content == f.content


def test_idempotency_is_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        answers = {}
        for name, client in (("route", paths.route), ("fast", paths.fast)):
            key = {"Idempotency-Key": f"order-1234-{name}"}
            first = client.post("/api/v1/messages", json=BODY, headers=key)
            same = json.dumps(dict(reversed(BODY.items())), indent=2).encode()
            again = client.post("/api/v1/messages", content=same, headers={**key, **JSON})
            other = client.post("/api/v1/messages", json={**BODY, "subject": "x"}, headers=key)
            assert again.json() == first.json()
            answers[name] = [[r.status_code, _headers(r), r.json()] for r in (first, again, other)]
    assert _anonymous(answers["route"]) == _anonymous(answers["fast"])
    assert [status for status, _, _ in answers["fast"]] == [202, 202, 409]
    assert answers["fast"][1][1]["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in answers["fast"][0][1]
    assert count(sqlite_store, api.messages) == 2


def test_store_trouble_is_the_routes(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch, _Unavailable) as paths:
        r, _ = paths.same(**_json(MINIMAL))
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0


def test_other_requests_go_to_fastapi(
    sqlite_settings: Settings,
    sqlite_store: Store,
    shop: tenancy.NewApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with both(sqlite_settings, sqlite_store, shop.api_key, monkeypatch) as paths:
        before = len(paths._taken)
        assert paths.fast.get("/api/v1/messages").status_code == 200
        assert paths.fast.put("/api/v1/messages", json=MINIMAL).status_code == 405
        slash = paths.fast.post("/api/v1/messages/", json=MINIMAL, follow_redirects=False)
        assert slash.status_code == 307
        assert paths.fast.get("/healthz").json()["status"] == "ok"
        assert "/api/v1/messages" in paths.fast.get("/api/openapi.json").json()["paths"]
        assert len(paths._taken) == before
