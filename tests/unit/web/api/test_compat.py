"""The compatible send APIs at their edges: Postmark's root paths only with its token (beside
the native fast path), malformed and oversized bodies in each provider's error shape, and
what needs templates or scheduling refused rather than ignored."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.ingest.accept import Acceptor
from postbode.store.engine import Store
from postbode.web.app import serving_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette's TestClient asks for httpx2
    from fastapi.testclient import TestClient

MAX_MESSAGE = 20_000


@pytest.fixture
def shop(sqlite_store: Store) -> tenancy.NewApp:
    created = tenancy.create_app(sqlite_store, "shop")
    tenancy.add_domain(sqlite_store, "shop", "shop.test")
    return created


@pytest.fixture
def client(sqlite_store: Store, tmp_path: object, shop: tenancy.NewApp) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, smtp_max_message_size=MAX_MESSAGE)
    acceptor = Acceptor(sqlite_store, "mta.postbode.test", allow_unverified=True)
    with TestClient(serving_app(settings, sqlite_store, acceptor)) as c:
        yield c


def postmark(key: str) -> dict[str, str]:
    return {"X-Postmark-Server-Token": key}


MESSAGE = {"From": "orders@shop.test", "To": "a@dest.test", "Subject": "Hi", "TextBody": "x"}


def test_postmark_root_paths_answer_only_requests_with_its_token(
    client: TestClient, shop: tenancy.NewApp
) -> None:
    assert client.post("/email", json=MESSAGE).status_code == 404
    sent = client.post("/email", json=MESSAGE, headers=postmark(shop.api_key))
    assert sent.status_code == 200 and sent.json()["ErrorCode"] == 0
    batch = client.post(
        "/email/batch", json=[MESSAGE, {**MESSAGE, "To": ""}], headers=postmark(shop.api_key)
    )
    assert [r["ErrorCode"] for r in batch.json()] == [0, 300]
    # The native API's fast path answers beside them.
    native = client.post(
        "/api/v1/messages",
        json={"from": "orders@shop.test", "to": ["a@dest.test"], "subject": "Hi", "text": "x"},
        headers={"Authorization": f"Bearer {shop.api_key}"},
    )
    assert native.status_code == 202


def test_postmark_errors_keep_postmarks_shape(client: TestClient, shop: tenancy.NewApp) -> None:
    h = postmark(shop.api_key)
    bad_json = client.post(
        "/compat/postmark/email", content=b"{", headers={**h, "content-type": "application/json"}
    )
    assert (bad_json.status_code, bad_json.json()["ErrorCode"]) == (422, 402)
    not_json = client.post("/compat/postmark/email", content=b"x", headers=h)
    assert not_json.json()["ErrorCode"] == 409
    huge = client.post(
        "/compat/postmark/email",
        json={**MESSAGE, "TextBody": "x" * (3 * MAX_MESSAGE + 2 * 1024 * 1024)},
        headers=h,
    )
    assert huge.status_code == 413 and set(huge.json()) == {"ErrorCode", "Message"}
    bad_to = client.post("/compat/postmark/email", json={**MESSAGE, "To": "a@-x.test"}, headers=h)
    assert bad_to.json() == {"ErrorCode": 300, "Message": "Invalid 'To' address: 'a@-x.test'."}
    header = client.post(
        "/compat/postmark/email",
        json={**MESSAGE, "Headers": [{"Name": "X-Evil", "Value": "a\r\nBcc: x@y.test"}]},
        headers=h,
    )
    assert header.status_code == 422 and "Headers" in header.json()["Message"]
    template = client.post(
        "/compat/postmark/email/withTemplate", json={**MESSAGE, "TemplateId": 1}, headers=h
    )
    assert template.status_code == 422 and template.json()["ErrorCode"] == 1101
    for field in ("TemplateAlias", "TemplateModel"):
        refused = client.post("/compat/postmark/email", json={**MESSAGE, field: "x"}, headers=h)
        assert refused.json()["ErrorCode"] == 300 and field in refused.json()["Message"]
    stream = client.post(
        "/compat/postmark/email", json={**MESSAGE, "MessageStream": "marketing"}, headers=h
    )
    assert stream.json()["ErrorCode"] == 1235


def test_sendgrid_and_mailgun_refuse_malformed_input_in_their_shapes(
    client: TestClient, shop: tenancy.NewApp
) -> None:
    bearer = {"Authorization": f"Bearer {shop.api_key}"}
    for body in (b"[", b"[]", b'{"personalizations": "x"}'):
        r = client.post(
            "/compat/sendgrid/v3/mail/send",
            content=body,
            headers={**bearer, "content-type": "application/json"},
        )
        assert r.status_code == 400 and set(r.json()["errors"][0]) == {"message", "field", "help"}
    unknown = client.post(
        "/compat/sendgrid/v3/mail/send",
        json={
            "personalizations": [{"to": [{"email": "a@dest.test"}], "substitutions": {"-n-": "1"}}],
            "from": {"email": "orders@shop.test"},
            "subject": "Hi",
            "content": [{"type": "text/plain", "value": "x"}],
        },
        headers=bearer,
    )
    assert unknown.json()["errors"][0]["field"] == "personalizations.0.substitutions"
    basic = ("api", shop.api_key)
    no_form = client.post("/compat/mailgun/v3/shop.test/messages", json={}, auth=basic)
    assert no_form.status_code == 400 and set(no_form.json()) == {"message"}
    two_tags = client.post(
        "/compat/mailgun/v3/shop.test/messages",
        data={
            "from": "orders@shop.test",
            "to": "a@dest.test",
            "subject": "Hi",
            "text": "x",
            "o:tag": ["a", "b"],
        },
        auth=basic,
    )
    assert two_tags.status_code == 400 and "o:tag" in two_tags.json()["message"]
    wrong_user_form = client.post(
        "/compat/mailgun/v3/shop.test/messages", data={"from": "x"}, auth=("api", "pb_x_y")
    )
    assert wrong_user_form.status_code == 401
