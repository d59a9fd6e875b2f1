"""Transient store errors — the database restarting, a connection dropped, a lock timeout —
told apart from bugs, and a way to run a write again until the store is back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")

PAUSES = (0.2, 0.5, 1.0, 2.0, 5.0)  # between tries; the last repeats


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the store was unavailable for a moment (worth trying again), not
    that the statement was wrong (a bug: trying again gives the same error)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def retrying(
    fn: Callable[[], T],
    what: str,
    *,
    give_up_after: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`fn()` (one whole transaction), run again after transient store errors for up to
    `give_up_after` seconds; other errors, and the last transient one, are raised. For
    blocking code (a worker's thread): it sleeps between tries."""
    deadline = clock() + give_up_after
    tries = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or clock() >= deadline:
                raise
            pause = PAUSES[min(tries, len(PAUSES) - 1)]
            tries += 1
            log.warning("%s: the store is unavailable (%s); again in %g s", what, exc, pause)
            sleep(pause)
