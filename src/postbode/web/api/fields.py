"""Bounded parameter types the API routes share: every number and instant a caller sends has
limits the store and Python's datetime can hold, so out-of-range input is a 422, never a 500."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Path
from pydantic import AfterValidator, BaseModel, model_validator

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


def _nul_at(value: Any, where: str = "") -> str | None:
    """Where in a JSON value a string holds a NUL character, if anywhere."""
    if isinstance(value, str):
        return where or "body" if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_at(key, where) or _nul_at(item, f"{where}.{key}".lstrip("."))
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _nul_at(item, f"{where}.{i}".lstrip("."))
            if found:
                return found
    return None


class ApiInput(BaseModel):
    """A request body of the API: no string in it holds a NUL character (no text column of
    PostgreSQL can keep one, and no address or name has one)."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        found = _nul_at(data)
        if found:
            raise ValueError(f"{found} must not contain NUL characters")
        return data
