"""Every table of Postbode's store, in SQLAlchemy Core, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Exists,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    func,
    select,
    text,
    true,
)

# Stable constraint names, so Alembic migrations name the same things on both dialects.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC instant: stored naive (SQLite has no zones), always returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current instant, timezone-aware."""
    return datetime.now(UTC)


_id_lock = threading.Lock()
_last_id = [0, 0]  # (milliseconds, random bits) of the newest id made by this process


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562 §5.7): time-ordered, so keyset pagination by id follows time.

    Within one millisecond a process's ids still increase (RFC 9562 §6.2, method 2: the random
    part is incremented), so events written together keep their order."""
    # The random bits are drawn before the lock is taken: os.urandom lets go of the GIL, and
    # a thread waiting for the lock would then wait for the holder to get the GIL back.
    fresh = int.from_bytes(os.urandom(10), "big") >> 8  # headroom for increments
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_id[0]:
            ms, rand = _last_id[0], _last_id[1] + 1
        else:
            rand = fresh
        _last_id[0], _last_id[1] = ms, rand
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return uuid.UUID(int=value)


def _id() -> Column[Any]:
    return Column("id", Uuid, primary_key=True, default=new_id)


def _created() -> Column[Any]:
    return Column("created_at", UTCDateTime, nullable=False, default=utcnow)


def _lease_columns() -> list[Column[Any]]:
    """The columns that make a table a leased queue (see store/claim.py)."""
    return [
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", UTCDateTime, nullable=False, default=utcnow),
        Column("lease_owner", String(64)),
        Column("lease_until", UTCDateTime),
    ]


def _limit_columns() -> list[Column[Any]]:
    """Sending limits of an app or a credential (abuse/limits.py); NULL: no limit."""
    return [
        Column("limit_per_minute", Integer),
        Column("limit_per_hour", Integer),
        Column("limit_per_day", Integer),
    ]


# -- tenancy ------------------------------------------------------------------------------

organizations = Table(
    "organizations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    # Retention defaults a new app starts with (privacy/retention.py enforces them per app).
    Column("raw_retention_days", Integer, nullable=False, server_default="7"),
    Column("metadata_retention_days", Integer, nullable=False, server_default="90"),
    Column("audit_retention_days", Integer, nullable=False, server_default="365"),
    # IANA name: the dashboard's "today" and custom ranges, the reports' times are read in it.
    Column("time_zone", String(64), nullable=False, server_default="UTC"),
    _created(),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False, unique=True),
    Column("password_hash", String(200), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("last_login_at", UTCDateTime),
    _created(),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column("role", String(16), nullable=False),  # owner | admin | viewer
    _created(),
    PrimaryKeyConstraint("user_id", "organization_id"),
)

apps = Table(
    "apps",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("status", String(16), nullable=False, default="active"),  # active | suspended
    Column("track_opens", Boolean, nullable=False, default=False),
    Column("track_clicks", Boolean, nullable=False, default=False),
    Column("max_message_age_seconds", Integer),  # NULL: the global setting
    Column("raw_retention_days", Integer, nullable=False, default=7),
    Column("metadata_retention_days", Integer, nullable=False, default=90),
    # False: a message's body is removed as soon as every delivery of it has ended.
    Column("store_bodies", Boolean, nullable=False, server_default=true()),
    # False: no open pixel or click link, whatever a message asks for.
    Column("tracking_allowed", Boolean, nullable=False, server_default=true()),
    # An abuse hold (abuse/hold.py): set, the app's new mail is accepted as `held` and its
    # queued mail is not sent until someone releases the app.
    Column("hold_reason", Text),
    Column("held_at", UTCDateTime),
    Column("held_by", String(320)),
    # Sending limits (abuse/limits.py): messages accepted per minute, hour, day; NULL: none.
    *_limit_columns(),
    _created(),
    # Names are the organisation's own: another organisation may have an app of the same name.
    UniqueConstraint("organization_id", "name"),
)

credentials = Table(
    "credentials",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(8), nullable=False),  # api | smtp
    Column("name", String(100), nullable=False, default=""),
    # API keys: the public prefix finds the row; the secret is kept only as a hash.
    # SMTP: the username finds the row; the password is kept as an argon2 hash.
    Column("lookup", String(64), nullable=False, unique=True),
    Column("secret_hash", String(200), nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    *_limit_columns(),
    _created(),
)

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    # A claim: any app may add any name (each claim with its own DKIM key and selector); DNS
    # decides who holds it. At most one claim of a name is verified (the index below).
    Column("name", String(253), nullable=False),
    Column("dkim_selector", String(63), nullable=False),
    Column("dkim_private_key", Text, nullable=False),
    Column("dkim_public_key", Text, nullable=False),  # the TXT value: v=DKIM1; k=rsa; p=…
    Column("verified_at", UTCDateTime),
    # Takes mail for routes (inbound/): its MX points at Postbode
    Column("inbound", Boolean, nullable=False, default=False, server_default=false()),
    Column("dns_status", JSON, nullable=False, default=dict),  # record -> pass|missing|wrong
    Column("dns_checked_at", UTCDateTime),
    # A rotated-out DKIM key stays published (listed in the DNS records) until this time, so
    # mail signed with it before the rotation still verifies; the new key signs from the start.
    Column("previous_dkim_selector", String(63)),
    Column("previous_dkim_public_key", Text),
    Column("previous_dkim_until", UTCDateTime),
    _created(),
    UniqueConstraint("app_id", "name"),
    Index(None, "name"),
    # The verified claim of a name is the one that sends, signs and takes its mail.
    Index(
        "uq_domains_verified_name",
        "name",
        unique=True,
        postgresql_where=text("verified_at IS NOT NULL"),
        sqlite_where=text("verified_at IS NOT NULL"),
    ),
)


def claimed_elsewhere() -> Exists:
    """True for a `domains` row whose name another app's claim holds verified: the name is not
    this claim's to send, sign or take mail for (tenancy.holders tells who holds a name)."""
    return _CLAIMED_ELSEWHERE


# Built once: making the alias and its column collection anew cost more than the query (the
# sender's key look-up ran it for every connection's worth of deliveries).
_OTHER_CLAIM = domains.alias("other")
_CLAIMED_ELSEWHERE = (
    select(_OTHER_CLAIM.c.id)
    .where(
        _OTHER_CLAIM.c.name == domains.c.name,
        _OTHER_CLAIM.c.app_id != domains.c.app_id,
        _OTHER_CLAIM.c.verified_at.is_not(None),
    )
    .exists()
)


organization_tokens = Table(
    "organization_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False, default=""),
    # As API keys: the public prefix finds the row; the secret is kept only as a hash.
    Column("lookup", String(64), nullable=False, unique=True),
    Column("secret_hash", String(200), nullable=False),
    Column("last_used_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    _created(),
)

# -- messages and their deliveries ----------------------------------------------------------

# The source of mail Postbode writes itself (alerts, reports): an app's hold never holds it.
SYSTEM_SOURCE = "system"

messages = Table(
    "messages",
    metadata,
    _id(),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("source", String(8), nullable=False),  # smtp | api | SYSTEM_SOURCE
    Column("stream", String(16), nullable=False, default="transactional"),
    Column("tag", String(100)),
    Column("metadata", JSON, nullable=False, default=dict),
    Column("message_id_header", String(998), nullable=False),
    Column("mail_from", String(320), nullable=False),
    Column("from_header", String(998), nullable=False, default=""),
    Column("subject", String(998), nullable=False, default=""),
    Column("size", Integer, nullable=False),
    Column("domain_verified", Boolean, nullable=False, default=False),
    Column("track_opens", Boolean, nullable=False, default=False),
    Column("track_clicks", Boolean, nullable=False, default=False),
    Column("received_at", UTCDateTime, nullable=False, default=utcnow),
    Column("raw_purged_at", UTCDateTime),
    # When retention replaced the recipients' addresses by keyed hashes (privacy/retention.py).
    Column("addresses_hashed_at", UTCDateTime),
    # A message made from a template (templates/): its alias and version, and the A/B test
    # variant it was given; `send_at` when it was scheduled for later.
    Column("template", String(100)),
    Column("template_version", Integer),
    Column("ab_test_id", Integer),
    Column("ab_variant", String(64)),
    Column("send_at", UTCDateTime),
    # rspamd's verdict (abuse/content.py), when a content scanner is configured.
    Column("spam_score", Float),
    Column("spam_symbols", JSON),
    Index(None, "app_id", "received_at"),
    Index(None, "app_id", "tag", "received_at"),
    Index(None, "message_id_header"),
    # The message log, newest first (ids are time-ordered): a page is an index range.
    Index(None, "app_id", "id"),
    Index(None, "app_id", "tag", "id"),
    Index(None, "app_id", "template", "received_at"),
    Index(None, "ab_test_id", "ab_variant"),
    # Retention's work lists: only messages still holding a body / clear addresses are in them,
    # so a purge never walks the history it already purged.
    Index(
        "ix_messages_raw_kept",
        "app_id",
        "received_at",
        sqlite_where=text("raw_purged_at IS NULL"),
        postgresql_where=text("raw_purged_at IS NULL"),
    ),
    Index(
        "ix_messages_addresses_kept",
        "app_id",
        "received_at",
        sqlite_where=text("addresses_hashed_at IS NULL"),
        postgresql_where=text("addresses_hashed_at IS NULL"),
    ),
)

raw_messages = Table(
    "raw_messages",
    metadata,
    Column("message_id", ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("compression", String(8), nullable=False, default="zlib"),
    Column("data", LargeBinary, nullable=False),
)

# What a delivery's `status` may be: one list for the API, the UI and queue management.
DeliveryStatus = Literal[
    "scheduled",  # waits for the message's send_at, then is claimed like a queued one
    "queued",
    "sending",
    "deferred",
    "delivered",
    "bounced",
    "failed",
    "suppressed",
    "held",
    "cancelled",
]
DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)

deliveries = Table(
    "deliveries",
    metadata,
    _id(),
    Column("message_id", ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("recipient_domain", String(253), nullable=False),
    *_lease_columns(),
    Column("first_queued_at", UTCDateTime, nullable=False, default=utcnow),
    Column("last_attempt_at", UTCDateTime),
    Column("verp_token", String(40), nullable=False, unique=True),
    Column("mx", String(253)),
    Column("last_reply", Text),
    Column("bounce_category", String(32)),
    Column("bounce_status", String(16)),
    Column("hard", Boolean),
    Column("error", Text),  # a bug's traceback, parked for the UI (the "shunt")
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow, onupdate=utcnow),
    # The claim: due rows by status and time.
    Index(None, "status", "next_attempt_at"),
    Index(None, "message_id"),
    Index(None, "app_id", "recipient"),
    Index(None, "app_id", "status", "recipient_domain"),
    Index(None, "lease_until"),
    # "Messages with a delivery in this state": one probe per message of the log.
    Index(None, "message_id", "app_id", "status"),
    # An app's recent outcomes (the last hour's hard bounces: abuse.guards, sending health).
    Index(None, "app_id", "status", "updated_at"),
)
# Recipient search ignores case (as people type addresses) without changing what is stored;
# an address's messages come out in id (time) order, so a page of a busy address is read from
# its newest end instead of sorting all of them.
Index(
    "ix_deliveries_app_id_lower_recipient_message_id",
    deliveries.c.app_id,
    func.lower(deliveries.c.recipient),
    deliveries.c.message_id,
)
# The log's state and bounce-category filters walk these from an app's newest message id
# (web/ui/search.py), so a page of bounced mail reads its 51 rows instead of probing every
# message. Partial: only the states and categories a filter looks for among the few (a
# delivered, queued or sending row is not in the first), so delivering mail seldom writes them.
WALKED_STATUSES: tuple[str, ...] = (
    "deferred",
    "bounced",
    "failed",
    "suppressed",
    "held",
    "cancelled",
)
_WALKED = "status IN (" + ", ".join(f"'{s}'" for s in WALKED_STATUSES) + ")"
# The index's predicate, and the same term for a query to say (both databases use a partial
# index only for a query whose conditions contain, or imply, its predicate).
IN_WALKED_STATUSES = text("deliveries." + _WALKED)
Index(
    "ix_deliveries_app_id_status_message_id",
    deliveries.c.app_id,
    deliveries.c.status,
    deliveries.c.message_id,
    sqlite_where=text(_WALKED),
    postgresql_where=text(_WALKED),
)
Index(
    "ix_deliveries_app_id_bounce_category_message_id",
    deliveries.c.app_id,
    deliveries.c.bounce_category,
    deliveries.c.message_id,
    sqlite_where=text("bounce_category IS NOT NULL"),
    postgresql_where=text("bounce_category IS NOT NULL"),
)

attempts = Table(
    "attempts",
    metadata,
    _id(),
    Column("delivery_id", ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("duration_ms", Integer, nullable=False, default=0),
    Column("outcome", String(16), nullable=False),  # Delivered | SoftFail | HardFail | Held
    Column("mx_host", String(253)),
    Column("ip", String(45)),
    Column("port", Integer),
    Column("tls_version", String(16)),
    Column("tls_cipher", String(100)),
    Column("reply_code", Integer),
    Column("enhanced_status", String(16)),
    Column("reply_text", Text),
    Column("transcript", Text, nullable=False, default=""),
    Index(None, "delivery_id", "started_at"),
)

events = Table(
    "events",
    metadata,
    _id(),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("message_id", Uuid),
    Column("delivery_id", Uuid),
    Column("recipient", String(320)),
    Column("type", String(32), nullable=False),
    Column("data", JSON, nullable=False, default=dict),
    _created(),
    Index(None, "app_id", "created_at"),
    Index(None, "app_id", "type", "created_at"),
    Index(None, "message_id"),
    Index(None, "delivery_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("stream", String(16), nullable=False, default="all"),  # all | transactional | broadcast
    Column("email", String(320), nullable=False),
    Column("reason", String(32), nullable=False),  # category, manual, complaint, unsubscribed …
    Column("source", String(16), nullable=False),  # bounce | complaint | manual | unsubscribe …
    Column("message_id", Uuid),
    Column("detail", Text),
    Column("expires_at", UTCDateTime),  # NULL: for good
    _created(),
    UniqueConstraint("app_id", "email", "stream"),
)

# -- webhooks and inbound ---------------------------------------------------------------------

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("url", String(2000), nullable=False),
    Column("event_types", JSON, nullable=False, default=list),  # empty: every type
    Column("format", String(16), nullable=False, default="native"),
    Column("enabled", Boolean, nullable=False, default=True),
    # Sealed (store/sealing.py): they must be readable to sign, so they are encrypted at rest.
    Column("secret", String(100), nullable=False),
    Column("previous_secret", String(100)),
    Column("previous_secret_until", UTCDateTime),
    Column("disabled_reason", Text),
    Column("failing_since", UTCDateTime),
    _created(),
)

webhook_requests = Table(
    "webhook_requests",
    metadata,
    _id(),
    Column("webhook_id", ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("event_id", Uuid, nullable=False),
    *_lease_columns(),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("delivered_at", UTCDateTime),
    _created(),
    Index(None, "status", "next_attempt_at"),
    Index(None, "webhook_id", "created_at"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    _id(),
    Column("request_id", ForeignKey("webhook_requests.id", ondelete="CASCADE"), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Column("response_body", Text),  # the first 1 KB
    Index(None, "request_id"),
)

# Inbound mail (inbound/): routes say which app takes mail for which address, and how.
ROUTE_ACTIONS = ("post", "hold", "reject")
ROUTE_FORMATS = ("native", "postmark")
INBOUND_STATUSES = ("pending", "sending", "delivered", "held", "failed")

routes = Table(
    "routes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    # local@domain, local@domain that also takes local+hash@domain, or *@domain; lower case
    Column("pattern", String(320), nullable=False),
    Column("action", String(8), nullable=False, default="post"),  # post | hold | reject
    Column("url", String(2000)),  # where `post` (and a released `hold`) sends the message
    Column("format", String(16), nullable=False, default="native"),  # native | postmark
    Column("secret", String(100), nullable=False),  # whsec_…, sealed: signs the hand-off
    Column("enabled", Boolean, nullable=False, default=True),
    _created(),
    # Per app: the listener takes only the routes of the app holding the domain (verified).
    UniqueConstraint("app_id", "pattern"),
    Index(None, "pattern"),
)

inbound_messages = Table(
    "inbound_messages",
    metadata,
    _id(),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("route_id", ForeignKey("routes.id", ondelete="SET NULL")),
    # post: hand off to the route's URL; hold: keep until released by hand
    Column("action", String(8), nullable=False, default="post"),
    Column("mail_from", String(320), nullable=False),
    Column("rcpt_to", String(320), nullable=False),
    Column("mailbox_hash", String(320), nullable=False, default=""),
    Column("from_header", String(998), nullable=False, default=""),
    Column("subject", String(998), nullable=False, default=""),
    Column("message_id_header", String(998)),
    Column("size", Integer, nullable=False, default=0),
    Column("client_ip", String(45)),
    Column("helo", String(255)),
    Column("raw", LargeBinary, nullable=False),  # zlib-compressed
    # SPF, DKIM and DMARC as computed once, before the first hand-off (inbound/verify.py)
    Column("verification", JSON),
    # rspamd's verdict (abuse/content.py), when a content scanner is configured
    Column("spam_score", Float),
    Column("spam_symbols", JSON),
    *_lease_columns(),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("received_at", UTCDateTime, nullable=False, default=utcnow),
    # when it last entered the queue (received, released, replayed): retries count from here
    Column("queued_at", UTCDateTime, nullable=False, default=utcnow),
    Column("delivered_at", UTCDateTime),
    Index(None, "status", "next_attempt_at"),
    Index(None, "app_id", "received_at"),
    Index(None, "app_id", "status", "id"),
    Index(None, "lease_until"),
)

inbound_attempts = Table(
    "inbound_attempts",
    metadata,
    _id(),
    Column("inbound_id", ForeignKey("inbound_messages.id", ondelete="CASCADE"), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("url", String(2000), nullable=False, default=""),
    Column("status_code", Integer),
    Column("error", Text),
    Column("response_body", Text),  # a short, sanitised excerpt (endpoints/destinations.py)
    Index(None, "inbound_id"),
)

# -- templates and A/B tests ----------------------------------------------------------------

templates = Table(
    "templates",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("alias", String(100), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    # The version messages are made from; NULL until one is chosen (a new template's first
    # version is chosen at once).
    Column("live_version", Integer),
    _created(),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    UniqueConstraint("app_id", "alias"),
)

template_versions = Table(
    "template_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("template_id", ForeignKey("templates.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("subject", Text, nullable=False),
    Column("html", Text),
    Column("text", Text),
    Column("layout", String(100)),  # the alias of another template of the app
    _created(),
    UniqueConstraint("template_id", "version"),
)

ab_tests = Table(
    "ab_tests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("template_id", ForeignKey("templates.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("status", String(16), nullable=False),  # running | ended
    Column("winner", String(64)),
    _created(),
    Column("ended_at", UTCDateTime),
    Index(None, "template_id", "status"),
)

ab_variants = Table(
    "ab_variants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("test_id", ForeignKey("ab_tests.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("subject", Text),  # NULL: the template's
    Column("html", Text),
    Column("text", Text),
    Column("weight", Integer, nullable=False),
    UniqueConstraint("test_id", "name"),
)

# -- statistics, singletons, audit ----------------------------------------------------------

stat_counters = Table(
    "stat_counters",
    metadata,
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("stream", String(16), nullable=False),
    Column("tag", String(100), nullable=False, default=""),
    # The alias of the template the message was made from ("": none), so per-template
    # figures read the counters as per-tag ones do.
    Column("template", String(100), nullable=False, default="", server_default=""),
    Column("bucket", UTCDateTime, nullable=False),  # the minute
    Column("event_type", String(32), nullable=False),
    Column("count", BigInteger, nullable=False, default=0),
    Column("bot_count", BigInteger, nullable=False, default=0),
    PrimaryKeyConstraint("app_id", "stream", "tag", "template", "bucket", "event_type"),
    Index(None, "app_id", "bucket"),
)

# Bounces per category (bounces/rules.toml) and hardness, bumped with the delivery.bounced
# event in its transaction as stat_counters are, and compacted alike (stats/rollup.py): the
# dashboards' top bounce reasons read these instead of the window's events and their JSON.
bounce_counters = Table(
    "bounce_counters",
    metadata,
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("stream", String(16), nullable=False),
    Column("tag", String(100), nullable=False, default=""),
    Column("bucket", UTCDateTime, nullable=False),  # the minute
    Column("category", String(32), nullable=False),
    Column("hard", Boolean, nullable=False),
    Column("count", BigInteger, nullable=False, default=0),
    PrimaryKeyConstraint("app_id", "stream", "tag", "bucket", "category", "hard"),
    Index(None, "app_id", "bucket"),
)

# Periodic tasks' turns (runner/periodic.py): one row per task, leased by whichever process
# runs it, so each runs once per period across every process and node.
worker_roles = Table(
    "worker_roles",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(64)),
    Column("lease_until", UTCDateTime),
    Column("last_run_at", UTCDateTime),
    Column("next_run_at", UTCDateTime),
    Column("last_error", Text),
    Column("last_duration_ms", Integer),
    Column("runs", Integer, nullable=False, server_default="0"),
    Column("failures", Integer, nullable=False, server_default="0"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(255), nullable=False),
    Column("body_hash", String(64), nullable=False),
    Column("response", JSON, nullable=False),
    _created(),
    PrimaryKeyConstraint("app_id", "key"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE")),
    Column("user_id", ForeignKey("users.id", ondelete="SET NULL")),
    Column("actor", String(320), nullable=False),  # a user's e-mail, `cli`, an API key name
    Column("action", String(64), nullable=False),
    Column("target", String(200), nullable=False, default=""),
    Column("data", JSON, nullable=False, default=dict),
    Column("ip", String(45)),
    _created(),
    Index(None, "organization_id", "created_at"),
)

system_values = Table(
    "system_values",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# -- abuse --------------------------------------------------------------------------------------

app_alerts = Table(
    "app_alerts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),  # limit | spike | bounce_rate | … (app.alert)
    Column("figures", JSON, nullable=False, default=dict),
    Column("held", Boolean, nullable=False, default=False),  # the app's new mail is held
    _created(),
    Index(None, "app_id", "created_at"),
)

# When an app last alerted of each kind: at most one alert per kind, app and hour, on any node.
alert_state = Table(
    "alert_state",
    metadata,
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("app_id", "kind"),
)

# Messages accepted per scope (`app:ID`, `credential:ID`) and window, for sending limits.
send_counters = Table(
    "send_counters",
    metadata,
    Column("scope", String(32), nullable=False),
    Column("period", String(8), nullable=False),  # minute | hour | day
    Column("bucket", UTCDateTime, nullable=False),  # the window's start
    Column("count", Integer, nullable=False),
    PrimaryKeyConstraint("scope", "period", "bucket"),
    Index(None, "bucket"),
)

login_attempts = Table(
    "login_attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(400), nullable=False),  # client IP or e-mail
    Column("at", Float, nullable=False),  # epoch seconds
    Index(None, "key", "at"),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    # The SHA-256 of the token the browser's cookie carries: a copy of this table signs no one in.
    Column("id", String(64), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("ip", String(45)),
    _created(),
    Index(None, "user_id"),
    Index(None, "expires_at"),
)

# Per-destination shaping shared by every worker process and node (delivery/shaping.py).
# Times are epoch seconds (floats): the token bucket and the slow-down compute with them.
destination_state = Table(
    "destination_state",
    metadata,
    Column("domain", String(253), primary_key=True),  # the recipient domain (A-labels)
    Column("tat", Float, nullable=False),  # the token bucket's theoretical arrival time
    Column("slow_low", Float, nullable=False, server_default="1.0"),  # factor at last slow-down
    Column("slow_last_signal", Float),  # the last throttling reply
    Column("slow_lowered_at", Float),  # the last slow-down
    Column("slow_reason", String(64), nullable=False, server_default=""),  # "421 4.7.0"
    Column("slow_since", UTCDateTime),  # the last slow-down, for people
    Column("used_at", Float, nullable=False),  # idle rows are forgotten
)

connection_slots = Table(
    "connection_slots",
    metadata,
    # Slot `slot` (0 … limit-1) of the MX host `host`, held by one worker process until
    # `lease_until` (epoch seconds), renewed while its connection is open: a killed holder's
    # slot frees itself when the lease runs out.
    Column("host", String(253), nullable=False),
    Column("slot", Integer, nullable=False),
    Column("holder", String(64), nullable=False),
    Column("lease_until", Float, nullable=False),
    PrimaryKeyConstraint("host", "slot"),
)

# Who gets an organisation's (or one app's) weekly or monthly report by e-mail, and the last
# period sent (stats/reports.py), so each period goes out once across every node.
report_subscriptions = Table(
    "report_subscriptions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("organization_id", ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("app_id", ForeignKey("apps.id", ondelete="CASCADE")),  # None: every app
    Column("period", String(8), nullable=False),  # weekly | monthly
    Column("last_sent", String(16)),  # the period key last sent: 2026-W49, 2026-11
    _created(),
    UniqueConstraint("organization_id", "user_id", "app_id", "period"),
)
