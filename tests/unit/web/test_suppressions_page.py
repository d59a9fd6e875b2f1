"""The suppression list page: search, add, remove, CSV import and export."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from sqlalchemy import select

from postbode.store.engine import Store
from postbode.store.schema import audit_log, suppressions

from .conftest import Browser, Org


def listed(store: Store) -> list[tuple[str, str, str, str]]:
    with store.read() as conn:
        rows = conn.execute(
            select(
                suppressions.c.email,
                suppressions.c.stream,
                suppressions.c.reason,
                suppressions.c.source,
            ).order_by(suppressions.c.email)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_add_search_remove(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, _, _ = ui
    added = admin.post(
        "/suppressions?app=shop",
        {"email": " Spam@Trap.test ", "reason": "manual", "stream": "broadcast"},
    )
    assert admin.flash(added) == "spam@trap.test added to the suppression list (broadcast)."
    assert listed(store) == [("spam@trap.test", "broadcast", "manual", "manual")]
    bad = admin.post("/suppressions?app=shop", {"email": "not an address"})
    assert "not an e-mail address" in admin.flash(bad)
    found = admin.get("/suppressions?app=shop&email=SPAM@trap.test").text
    assert "spam@trap.test" in found
    assert "The suppression list is empty." not in found
    assert "No suppressions match." in admin.get("/suppressions?app=shop&email=x@y.test").text
    assert admin.get("/suppressions?app=shop&email=nope").status_code == 400
    removed = admin.post(
        "/suppressions/remove?app=shop", {"email": "spam@trap.test", "stream": "broadcast"}
    )
    assert admin.flash(removed) == "spam@trap.test removed from the suppression list."
    assert listed(store) == []
    gone = admin.post("/suppressions/remove?app=shop", {"email": "spam@trap.test"})
    assert "was not on the suppression list" in admin.flash(gone)
    with store.read() as conn:
        actions = conn.execute(select(audit_log.c.action).order_by(audit_log.c.id)).scalars()
        assert [a for a in actions if a.startswith("suppression")] == [
            "suppression.add",
            "suppression.remove",
        ]


def test_import_and_export(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, _, _ = ui
    data = "email,reason,stream\r\na@x.test,complaint,all\r\nnot-an-address,,\r\nB@x.test,,\r\n"
    response = admin.client.post(
        "/suppressions/import?app=shop",
        data={"csrf_token": admin.token},
        files={"file": ("list.csv", data.encode(), "text/csv")},
    )
    assert response.status_code == 200, response.text
    assert "<strong>2</strong> added" in response.text and "from 3 rows" in response.text
    assert "not an e-mail address" in response.text
    assert listed(store) == [
        ("a@x.test", "all", "complaint", "import"),
        ("b@x.test", "all", "manual", "import"),
    ]
    export = admin.get("/suppressions/export.csv?app=shop")
    assert export.headers["content-disposition"].startswith(
        'attachment; filename="suppressions-shop-'
    )
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [(r["email"], r["reason"]) for r in rows] == [
        ("a@x.test", "complaint"),
        ("b@x.test", "manual"),
    ]
    not_utf8 = admin.client.post(
        "/suppressions/import?app=shop",
        data={"csrf_token": admin.token},
        files={"file": ("list.csv", "email\r\nä@x.test\r\n".encode("latin-1"), "text/csv")},
    )
    assert not_utf8.status_code == 422 and "not UTF-8" in not_utf8.text
    too_big = admin.client.post(
        "/suppressions/import?app=shop",
        data={"csrf_token": admin.token},
        files={"file": ("big.csv", b"email\r\n" + b"a@x.test\r\n" * 1_200_000, "text/csv")},
    )
    assert too_big.status_code == 413
