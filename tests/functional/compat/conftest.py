"""Peers for the compatible-API tests, beside the functional tests' DNS server, MX sink and shop
app (tests/functional/conftest.py): Postbode in-process with its HTTP side, and Django
configured for django-anymail."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import django
import pytest
from django.conf import settings as django_settings
from sqlalchemy import select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.dns import LoopbackDNS
from postbode.testing.servers import HttpPostbode
from postbode.testing.sink import Received

if not django_settings.configured:
    django_settings.configure(
        SECRET_KEY="compat-tests",
        INSTALLED_APPS=["anymail"],
        ALLOWED_HOSTS=["*"],
        USE_TZ=True,
        ANYMAIL={},
        DEFAULT_FROM_EMAIL="Shop <orders@shop.test>",
    )
    django.setup()


@pytest.fixture
def postbode(
    settings: Settings, store: Store, dns_server: LoopbackDNS, shop: tenancy.NewApp
) -> Iterator[HttpPostbode]:
    """Postbode with SMTP, HTTP and a delivery worker, resolving through `dns_server`."""
    changed = settings.model_copy(
        update={"dns_nameservers": dns_server.nameserver, "smtp_hostname": "mta.postbode.test"}
    )
    with HttpPostbode(changed, store) as server:
        yield server


def stored(store: Store, message_id: str) -> Any:
    """The messages row of a message id (the UUID the compatible APIs answer with)."""
    with store.read() as conn:
        return conn.execute(select(messages).where(messages.c.id == uuid.UUID(message_id))).one()


def stored_by_header(store: Store, header: str) -> Any:
    with store.read() as conn:
        return conn.execute(select(messages).where(messages.c.message_id_header == header)).one()


def parts(received: Received) -> dict[str, Any]:
    """What a delivered message carries, for assertions: its headers, text and html bodies,
    and attachments by file name ((content type, bytes, disposition, Content-ID))."""
    msg: EmailMessage = received.message
    found: dict[str, Any] = {"text": None, "html": None, "attachments": {}}
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        if disposition in ("attachment", "inline") and part.get_filename():
            found["attachments"][part.get_filename()] = (
                part.get_content_type(),
                part.get_payload(decode=True),
                disposition,
                part.get("Content-ID"),
            )
        elif part.get_content_type() == "text/plain" and found["text"] is None:
            found["text"] = part.get_content()
        elif part.get_content_type() == "text/html" and found["html"] is None:
            found["html"] = part.get_content()
    return found


@contextlib.contextmanager
def no_warnings_from_anymail() -> Iterator[None]:
    """django-anymail warns that it no longer officially supports SendGrid: expected here."""
    import warnings

    from anymail.exceptions import AnymailNotSupportedWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=AnymailNotSupportedWarning)
        yield
