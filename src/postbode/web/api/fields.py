"""Bounded parameter types the API routes share: every number and instant a caller sends has
limits the store and Python's datetime can hold, so out-of-range input is a 422, never a 500."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator

MAX_ROW_ID = 2**31 - 1  # PostgreSQL `integer`, the type of the tables' serial ids
MAX_SECONDS = 100 * 365 * 86400  # a span of time given in seconds: a century at most
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


def _instant(value: datetime) -> datetime:
    """`value` in UTC (UTC if it has no zone), between 1970 and 9000."""
    try:
        at = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range") from None
    if not EARLIEST <= at < LATEST:
        raise ValueError("the time must be between 1970 and 9000")
    return at


Instant = Annotated[datetime, AfterValidator(_instant)]
"""An ISO 8601 time (UTC if no zone), 1970 to 9000, given back in UTC."""

RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
"""The id of a row in a table with a serial id, as a path parameter."""
