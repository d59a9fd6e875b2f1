"""The management and compatible APIs fuzzed from /api/openapi.json (schemathesis), each
with the credentials it takes: whatever the input, the answer is never a 5xx."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from argon2 import PasswordHasher
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.web.app import create_app

EXAMPLES = 8  # per operation


def credentials(path: str, api_key: str, org_token: str) -> dict[str, str]:
    if path.startswith("/compat/postmark") or path.startswith("/email"):
        return {"X-Postmark-Server-Token": api_key}
    if path.startswith("/compat/sendgrid"):
        return {"Authorization": f"Bearer {api_key}"}
    if path.startswith("/compat/mailgun"):
        basic = base64.b64encode(f"api:{api_key}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}
    return {"Authorization": f"Bearer {org_token}"}


def fuzzer(operation: Any, headers: dict[str, str]) -> Callable[[], None]:
    """A hypothesis test calling `operation` with generated input and `headers`."""

    @given(case=operation.as_strategy())
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            response = case.call(headers=headers)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.query} {case.body!r}: "
            f"{response.status_code} {response.text[:300]}"
        )

    return fuzz


@pytest.mark.timeout(900)
def test_no_input_makes_a_server_error(
    sqlite_store: Store, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subject is error handling, not key or password strength: one DKIM key for every
    # domain the fuzzer adds, and argon2 at its lowest cost.
    key = tenancy.generate_dkim_key()
    monkeypatch.setattr(tenancy, "generate_dkim_key", lambda bits=2048: key)
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    store = sqlite_store
    settings = Settings(data_dir=tmp_path, smtp_max_message_size=50_000)
    app = create_app(settings, store)
    shop = tenancy.create_app(store, "shop", "acme")
    tenancy.add_domain(store, "shop", "shop.test")
    token = str(tenancy.create_org_token(store, "acme")["token"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    ours = (
        "/compat/",
        "/email",
        "/api/v1/apps",
        "/api/v1/users",
        "/api/v1/tokens",
        "/api/v1/domains",
        "/api/v1/audit",
    )
    operations = [
        op
        for op in (result.ok() for result in schema.get_all_operations())
        if op.path.startswith(ours)
    ]
    assert len(operations) > 30
    failures: list[str] = []
    for operation in operations:
        fuzz = fuzzer(operation, credentials(operation.path, shop.api_key, token))
        try:
            fuzz()
        except Exception as exc:  # a 5xx, or an exception the app let escape
            failures.append(f"{operation.method.upper()} {operation.path}: {exc!r}"[:2000])
    assert not failures, "\n".join(failures)
