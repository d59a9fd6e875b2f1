"""Roles: viewers see, admins change, owners manage users; other organizations stay apart."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import deliveries, memberships, suppressions
from postbode.testing.factories import make_queued_message

from .conftest import PASSWORD, Browser, Org


def test_a_viewer_sees_pages_without_their_actions(
    ui: tuple[Store, Org, Callable], viewer: Browser
) -> None:
    store, org, _ = ui
    message_id, _ = make_queued_message(store, org.shop.app_id, ["a@dest.test"])
    for path, action in (
        (f"/messages/{message_id}", "/deliveries/"),
        ("/queue", "Retry selected"),
        ("/suppressions", 'action="/suppressions/import'),
        ("/settings/apps/shop", "New credential"),
        ("/settings", "New app"),
    ):
        page = viewer.get(path)
        assert page.status_code == 200, path
        assert action not in page.text, path
    assert viewer.get("/users").status_code == 403
    assert "Users</a>" not in viewer.get("/dashboard").text


def test_a_viewer_cannot_change_anything(ui: tuple[Store, Org, Callable], viewer: Browser) -> None:
    store, org, _ = ui
    message_id, (delivery_id,) = make_queued_message(store, org.shop.app_id, ["a@dest.test"])
    for path, data in (
        (f"/messages/{message_id}/deliveries/{delivery_id}/cancel", {}),
        (f"/queue/{delivery_id}/cancel", {}),
        ("/suppressions", {"email": "a@dest.test"}),
        ("/settings/apps/shop/credentials", {"kind": "api"}),
        ("/users", {"email": "x@org.test", "role": "owner"}),
    ):
        response = viewer.post(path, data)
        assert response.status_code == 403, path
        assert "Not allowed" in response.text
    with store.read() as conn:
        assert conn.execute(select(deliveries.c.status)).scalar_one() == "queued"
        assert conn.execute(select(suppressions)).first() is None


def test_an_admin_changes_but_does_not_manage_users(
    ui: tuple[Store, Org, Callable], admin: Browser
) -> None:
    store, org, _ = ui
    message_id, (delivery_id,) = make_queued_message(store, org.shop.app_id, ["a@dest.test"])
    page = admin.get(f"/messages/{message_id}")
    assert f"/deliveries/{delivery_id}/cancel" in page.text
    assert admin.get("/users").status_code == 403
    assert admin.post("/users/3/role", {"role": "owner"}).status_code == 403


def test_another_organizations_data_is_not_found(ui: tuple[Store, Org, Callable]) -> None:
    store, org, browser = ui
    tenancy.create_user(store, "boss@other.test", PASSWORD, admin=True, organization="other")
    elsewhere = tenancy.create_app(store, "elsewhere", organization="other")
    theirs, (delivery_id,) = make_queued_message(store, elsewhere.app_id, ["a@dest.test"])
    mine, _ = make_queued_message(store, org.shop.app_id, ["b@dest.test"])
    b: Browser = browser()
    b.login("owner@org.test")
    assert b.get(f"/messages/{theirs}").status_code == 404
    assert b.get(f"/messages/{theirs}/preview").status_code == 404
    assert b.get(f"/messages/{theirs}/raw").status_code == 404
    assert b.get("/settings/apps/elsewhere").status_code == 404
    listed = b.get("/messages").text
    assert str(mine) in listed and str(theirs) not in listed
    assert b.post(f"/messages/{theirs}/deliveries/{delivery_id}/cancel").status_code == 404
    # ?app= naming another organization's app is ignored: the page shows this one's.
    assert str(theirs) not in b.get("/messages?app=elsewhere").text


def test_owners_manage_users(ui: tuple[Store, Org, Callable], owner: Browser) -> None:
    store, org, browser = ui
    page = owner.get("/users")
    assert "viewer@org.test" in page.text and "admin@org.test" in page.text
    made = owner.post("/users", {"email": "New@Org.test", "role": "admin", "password": ""})
    assert made.status_code == 200 and "not shown again" in made.text
    password = made.text.split('id="secret-2">')[1].split("<")[0]
    newcomer: Browser = browser()
    newcomer.login("new@org.test", password)
    assert "Retry selected" in newcomer.get("/queue").text  # an admin
    promoted = owner.post(f"/users/{org.viewer_id}/role", {"role": "admin"})
    assert owner.flash(promoted) == "viewer@org.test is now admin."
    with store.read() as conn:
        role = conn.execute(
            select(memberships.c.role).where(memberships.c.user_id == org.viewer_id)
        ).scalar_one()
    assert role == "admin"
    chosen = owner.post(
        "/users", {"email": "mine@org.test", "role": "viewer", "password": "a chosen password"}
    )
    assert owner.flash(chosen) == "mine@org.test can now sign in as viewer."
    duplicate = owner.post("/users", {"email": "mine@org.test", "role": "viewer"})
    assert "already exists" in owner.flash(duplicate)


def test_the_last_owner_stays_an_owner(ui: tuple[Store, Org, Callable], owner: Browser) -> None:
    _, org, _ = ui
    response = owner.post(f"/users/{org.owner_id}/role", {"role": "viewer"})
    assert response.status_code == 409 and "needs an owner" in response.text
    owner.post(f"/users/{org.admin_id}/role", {"role": "owner"})
    assert owner.post(f"/users/{org.owner_id}/role", {"role": "viewer"}).status_code == 303
    assert owner.get("/users").status_code == 403  # no longer an owner, at once


def test_switch_organization(ui: tuple[Store, Org, Callable], viewer: Browser) -> None:
    store, org, _ = ui
    from sqlalchemy import insert

    from postbode.store.schema import organizations

    tenancy.create_user(store, "boss@other.test", PASSWORD, admin=True, organization="other")
    tenancy.create_app(store, "elsewhere", organization="other")
    with store.write() as conn:
        other_id = conn.execute(
            select(organizations.c.id).where(organizations.c.name == "other")
        ).scalar_one()
        conn.execute(
            insert(memberships).values(
                user_id=org.viewer_id, organization_id=other_id, role="admin"
            )
        )
    page = viewer.get("/settings").text
    assert 'id="org-switch"' in page and "elsewhere" not in page
    switched = viewer.post("/session/organization", {"organization": str(other_id)})
    assert viewer.flash(switched) == "Switched to other."
    page = viewer.get("/settings").text
    assert "elsewhere" in page and "New app" in page  # an admin there
    assert viewer.post("/session/organization", {"organization": "999"}).status_code == 404
