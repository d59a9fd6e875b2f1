"""Transient store errors are tried again for a while; bugs are not."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from postbode.store.retry import is_transient, retrying

GONE = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
BUG = IntegrityError("INSERT", {}, Exception("duplicate key"))


def test_transient_errors_are_tried_again_until_they_pass() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise GONE
        return "written"

    assert retrying(flaky, "test", sleep=slept.append) == "written"
    assert len(calls) == 4 and slept == [0.2, 0.5, 1.0]


def test_a_bug_is_raised_at_once() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise BUG

    with pytest.raises(IntegrityError):
        retrying(broken, "test", sleep=lambda s: None)
    assert calls == [1]
    assert not is_transient(BUG) and is_transient(GONE)


def test_the_store_is_given_up_on_after_the_deadline() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def down() -> None:
        raise GONE

    with pytest.raises(OperationalError):
        retrying(down, "test", give_up_after=10, sleep=sleep, clock=lambda: now[0])
    assert 10 <= now[0] < 16
