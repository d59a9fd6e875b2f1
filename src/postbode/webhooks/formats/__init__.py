"""Webhook payload formats: `format(event_row, message_row) -> dict`, one module per format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from postbode.webhooks.formats import native


class Format(Protocol):
    """Builds one webhook payload.

    `event` has the columns of `events` plus `app` (the app's name); `message` has the
    columns of `messages`, or is None for events about no message (e.g. `app.alert`)."""

    def __call__(
        self, event: Mapping[Any, Any], message: Mapping[Any, Any] | None
    ) -> dict[str, Any]: ...


FORMATS: dict[str, Format] = {"native": native.format}
"""Every format an endpoint may choose, by name (provider formats plug in here)."""


def get(name: str) -> Format:
    """The format called `name`; KeyError for an unknown one."""
    return FORMATS[name]
