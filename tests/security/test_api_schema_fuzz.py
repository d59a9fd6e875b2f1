"""Every documented API route, fuzzed from /api/openapi.json (schemathesis): whatever the
input, the answer is never a 5xx."""

from __future__ import annotations

import warnings
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing.factories import make_app
from postbode.web.app import create_app

EXAMPLES = 30  # per operation


def test_no_input_makes_a_server_error(settings: Settings, store: Store) -> None:
    app = create_app(settings, store)
    key = make_app(store).api_key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /api/v1/messages", "POST /api/v1/deliveries/cancel"} <= documented
    failures: list[str] = []
    for operation in operations:

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
                response = case.call(headers={"Authorization": f"Bearer {key}"})
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query} {case.body!r}: "
                f"{response.status_code} {response.text[:300]}"
            )

        try:
            fuzz()
        except Exception as exc:  # a 5xx, or an exception the app let escape
            failures.append(f"{operation.method.upper()} {operation.path}: {exc!r}"[:2000])
    assert not failures, "\n".join(failures)
