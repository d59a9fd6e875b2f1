"""A browser-like TestClient for the UI: sign in, read CSRF tokens, post forms."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.web.app import create_app

with warnings.catch_warnings():
    # Starlette's TestClient asks for httpx2 and warns when it runs on httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """A TestClient that keeps cookies like a browser and knows the forms' CSRF token."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.token = ""

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, **kwargs)
        found = (
            _CSRF.search(response.text)
            if "text/html" in response.headers.get("content-type", "")
            else None
        )
        if found:
            self.token = found.group(1)
        return response

    def post(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """A form post carrying the CSRF token of the last page read (read one first)."""
        if not self.token:
            self.get("/dashboard")
        kwargs.setdefault("follow_redirects", False)
        return self.client.post(path, data={"csrf_token": self.token, **(data or {})}, **kwargs)

    def login(self, email: str, password: str = PASSWORD) -> Any:
        self.get("/login")
        response = self.post("/login", {"email": email, "password": password})
        assert response.status_code == 303, response.text
        self.get("/dashboard")
        return response

    def flash(self, response: Any) -> str:
        """The notice a redirect carries, as the next page shows it."""
        assert response.status_code == 303, response.text
        page = self.get(response.headers["location"])
        found = re.search(r'class="flash flash-\w+" role="status">([^<]*)<', page.text)
        return found.group(1) if found else ""


@pytest.fixture(autouse=True)
def _cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 at its lowest cost: these tests are about the UI, not password hashing."""
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


@pytest.fixture
def make_ui(tmp_path: Path) -> Iterator[Callable[..., tuple[Settings, Callable[[], Browser]]]]:
    """For a store (and settings to override): settings and a factory of signed-out browsers
    on one app."""
    clients: list[TestClient] = []

    def make(store: Store, **overrides: Any) -> tuple[Settings, Callable[[], Browser]]:
        url = store.engine.url.render_as_string(hide_password=False)
        settings = Settings(
            data_dir=tmp_path, database_url=url, secret_key="ui-test-key", **overrides
        )
        app = create_app(settings, store)

        def browser(base_url: str = "http://testserver") -> Browser:
            client = TestClient(app, base_url=base_url)
            clients.append(client)
            return Browser(client)

        return settings, browser

    yield make
    for client in clients:
        client.close()


class Org:
    """An organization with an owner, an admin, a viewer and an app called shop."""

    def __init__(self, store: Store) -> None:
        self.owner_id = tenancy.create_user(store, "owner@org.test", PASSWORD, admin=True)
        self.admin_id = tenancy.create_user(store, "admin@org.test", PASSWORD, role="admin")
        self.viewer_id = tenancy.create_user(store, "viewer@org.test", PASSWORD, role="viewer")
        self.shop = tenancy.create_app(store, "shop")


@pytest.fixture
def ui(
    sqlite_store: Store, make_ui: Callable[[Store], tuple[Settings, Callable[[], Browser]]]
) -> tuple[Store, Org, Callable[[], Browser]]:
    """The UI on SQLite with an organization in it: (store, org, new browser)."""
    _, browser = make_ui(sqlite_store)
    return sqlite_store, Org(sqlite_store), browser


@pytest.fixture
def owner(ui: tuple[Store, Org, Callable[[], Browser]]) -> Browser:
    b = ui[2]()
    b.login("owner@org.test")
    return b


@pytest.fixture
def admin(ui: tuple[Store, Org, Callable[[], Browser]]) -> Browser:
    b = ui[2]()
    b.login("admin@org.test")
    return b


@pytest.fixture
def viewer(ui: tuple[Store, Org, Callable[[], Browser]]) -> Browser:
    b = ui[2]()
    b.login("viewer@org.test")
    return b
