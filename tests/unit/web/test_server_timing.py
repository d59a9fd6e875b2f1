"""Every answer says how long the server took (Server-Timing), and the walk reads it back."""

from __future__ import annotations

import pytest

from postbode.web.timing import server_ms

from .conftest import Browser


def test_a_page_and_an_api_answer_carry_their_server_time(owner: Browser) -> None:
    for path in ("/dashboard", "/messages", "/healthz"):
        answer = owner.get(path)
        assert answer.status_code == 200, path
        took = server_ms(answer.headers.get("server-timing"))
        assert took is not None and took > 0, (path, answer.headers.get("server-timing"))


@pytest.mark.parametrize(
    ("header", "ms"),
    [
        ("app;dur=12.5", 12.5),
        ('db;dur=3, app;desc="render";dur=40', 40.0),
        ("cache;desc=hit", None),
        ("app;dur=soon", None),
        (None, None),
    ],
)
def test_the_app_duration_is_read_from_a_server_timing_header(
    header: str | None, ms: float | None
) -> None:
    assert server_ms(header) == ms
