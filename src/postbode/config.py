"""The one settings schema: every setting with its type, default and one sentence."""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the optional TOML file named by POSTBODE_CONFIG (lower priority than env)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("POSTBODE_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                self._data = {k.lower(): v for k, v in tomllib.load(f).items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """Postbode's settings: environment variables POSTBODE_<NAME> override the TOML file."""

    model_config = SettingsConfigDict(env_prefix="POSTBODE_", extra="ignore")

    # -- store ------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("./data"),
        description="Directory for the embedded SQLite store, TLS certificate and other state.",
    )
    database_url: str | None = Field(
        None,
        description="Database URL overriding the embedded SQLite file; "
        "`postgresql://…` selects PostgreSQL.",
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Key for signing sessions, tracking links and tokens, and for encrypting "
        "webhook and route signing secrets; generated into the data directory when empty.",
    )

    # -- listeners --------------------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Address the HTTP API and web UI listen on.")
    http_port: int = Field(
        8025, ge=0, le=65535, description="Port the HTTP API and web UI listen on."
    )
    http_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body of an HTTP route, refused with 413 as it streams in "
        "(the send API takes twice smtp_max_message_size, CSV imports 10 MiB).",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or CIDRs of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers are believed; empty: none, the peer "
        "address is the client's.",
    )
    smtp_host: str = Field("127.0.0.1", description="Address the SMTP listener binds to.")
    smtp_port: int = Field(
        2525, ge=0, le=65535, description="Port of the SMTP listener (submission and bounces)."
    )
    smtp_hostname: str = Field(
        "postbode.localhost",
        description="Host name used in the SMTP banner, EHLO and Received headers.",
    )
    alert_sender: str = Field(
        "",
        description="From address of the alert e-mails Postbode sends to organisation owners "
        "and admins; empty: postbode@ and smtp_hostname.",
    )
    smtp_max_message_size: int = Field(
        25 * 1024 * 1024, ge=1, description="Largest message accepted, in bytes (SMTP SIZE)."
    )
    allow_unverified_domains: bool = Field(
        False,
        description="Let apps send from domains whose DKIM and SPF records were not found yet "
        "(for development and tests: `make run` sets it); otherwise such mail is refused.",
    )
    smtp_max_unauthenticated_message_size: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest message accepted without AUTH (bounces, inbound mail), in bytes; "
        "refused with 552 5.3.4 as it streams in.",
    )
    smtp_max_unauthenticated_sessions: int = Field(
        200,
        ge=1,
        description="Sessions that may be in a mail transaction without AUTH at once, per "
        "listener process; more are turned away with 421 4.7.0.",
    )
    smtp_max_unauthenticated_sessions_per_ip: int = Field(
        20,
        ge=1,
        description="Of those, how many may come from one client address.",
    )
    smtp_max_recipients: int = Field(50, ge=1, description="Most recipients accepted per message.")
    smtp_tls_cert: Path | None = Field(
        None,
        description="PEM certificate for STARTTLS; a self-signed one is generated when unset.",
    )
    smtp_tls_key: Path | None = Field(None, description="PEM private key for smtp_tls_cert.")
    smtp_auth_require_tls: bool = Field(
        True, description="Refuse AUTH before STARTTLS, except from loopback clients."
    )
    smtp_auth_max_failures: int = Field(
        5,
        ge=0,
        description="Failed AUTH attempts per client IP per 10 minutes before 421 throttling "
        "(counted in the store, across every node).",
    )
    smtp_auth_max_failures_per_user: int = Field(
        20,
        ge=1,
        description="Failed AUTH attempts per user name per 10 minutes, from any address, "
        "after which its attempts are refused with 454 4.7.0 before any hashing.",
    )
    smtp_auth_max_failures_total: int = Field(
        1000,
        ge=1,
        description="Failed AUTH attempts in all per 10 minutes after which every attempt "
        "that would need a password hash is refused with 454 4.7.0.",
    )

    # -- delivery ---------------------------------------------------------------------------
    dns_nameservers: str = Field(
        "",
        description="Comma-separated DNS servers (host or host:port) for MX lookups; "
        "empty uses the system resolver.",
    )
    transport_map: str = Field(
        "",
        description="Routes for domains instead of MX: `example.test=127.0.0.1:2600,"
        "*.corp.test=127.0.0.1:2601`.",
    )
    return_path_domain: str = Field(
        "return.postbode.localhost",
        description="Domain of the VERP return path used as envelope sender for bounces.",
    )
    tracking_url: str = Field(
        "http://127.0.0.1:8025",
        description="Public base URL of the open/click tracking endpoints.",
    )
    delivery_concurrency: int = Field(
        100, ge=1, description="Deliveries a worker process sends at once."
    )
    delivery_batch_size: int = Field(200, ge=1, description="Deliveries claimed per queue claim.")
    delivery_lease_seconds: int = Field(
        300, ge=1, description="How long a claimed delivery stays leased to one worker."
    )
    retry_cap_seconds: int = Field(
        7200, ge=1, description="Longest wait between delivery attempts."
    )
    max_message_age_seconds: int = Field(
        3 * 24 * 3600,
        ge=1,
        description="Age after which an undelivered message fails as expired (per-app override).",
    )
    smtp_connect_timeout: float = Field(30.0, gt=0, description="Seconds to wait for TCP connect.")
    smtp_command_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds to wait for a reply to one SMTP command (RFC 5321 §4.5.3.2).",
    )
    smtp_data_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for the reply after the end of DATA."
    )
    tls_policy: str = Field(
        "",
        description="Per-destination TLS: `secure.test=verify,*.bank.test=require` "
        "(`opportunistic` is the default).",
    )
    shaping_max_connections: int = Field(
        20,
        ge=0,
        description="Concurrent connections to one MX host, for every worker process on "
        "every node together (0: no limit).",
    )
    shaping_rate_per_minute: int = Field(
        0,
        ge=0,
        description="Messages per minute to one recipient domain, for every worker process "
        "on every node together (0: no limit).",
    )
    shaping_rules: str = Field(
        "",
        description="Per-destination limits overriding the two above: `;`-separated "
        "`pattern=option:value,…` entries (pattern `domain`, `*.domain` or `*`; options "
        "`conn:N`, `rate:N` per minute or `N/s`, `N/h`, `burst:N`, `adaptive:off`), e.g. "
        "`gmail.test=conn:5,rate:300;*.corp.test=rate:60/h`.",
    )
    shaping_max_wait_seconds: float = Field(
        5.0,
        ge=0,
        description="Longest a worker waits for a shaping slot while holding a delivery; "
        "a later slot releases it as deferred until then.",
    )
    shaping_slowdown_seconds: int = Field(
        600,
        ge=0,
        description="After a throttling reply (421, `too many connections` …) a domain's "
        "limits are halved for this long, then recover over as long again.",
    )

    # -- processes --------------------------------------------------------------------------
    workers: int = Field(
        2,
        ge=0,
        description="Worker processes `postbode serve` starts beside the HTTP and SMTP roles "
        "when mail comes in faster than it delivers it itself (0: never; delivery stays in the "
        "serve process). Two keep a 2-core machine's cores busy when mail comes in fast: each "
        "signs and sends on its own core.",
    )
    worker_idle_seconds: float = Field(
        60.0,
        ge=0,
        description="A worker process of `postbode serve` exits after this long without work, "
        "and the serve process drains the queues itself again (0: the worker processes run "
        "from start to stop, and the serve process delivers nothing itself).",
    )
    listeners: int = Field(
        1,
        ge=1,
        description="Processes `postbode serve` runs the HTTP and SMTP listeners in. More than "
        "one share the ports (SO_REUSEPORT) so that taking mail in uses more cores; the ports "
        "must then be fixed (not 0).",
    )
    runner_poll_seconds: float = Field(
        0.25,
        gt=0,
        description="How often an idle queue runner looks for work no wake-up announced "
        "(work queued by a process that cannot wake it, retries coming due).",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")

    # -- webhooks and tracking --------------------------------------------------------------
    webhook_concurrency: int = Field(
        50, ge=1, description="Webhook requests a worker process has in flight at once."
    )
    webhook_timeout: float = Field(
        10.0, gt=0, description="Seconds a webhook endpoint has to answer one request in full."
    )
    webhook_retry_cap_seconds: int = Field(
        3600, ge=1, description="Longest wait between attempts of one webhook request."
    )
    webhook_retry_window_seconds: int = Field(
        24 * 3600, ge=0, description="How long a webhook request is retried before it fails."
    )
    webhook_disable_after_seconds: int = Field(
        3 * 24 * 3600,
        ge=0,
        description="An endpoint failing without one success for this long is disabled.",
    )
    dns_check_every_seconds: int = Field(
        3600,
        ge=1,
        description="How often every domain's DNS records are looked up again (a change is a "
        "domain.dns_changed event).",
    )
    abuse_check_every_seconds: float = Field(
        30.0,
        description="How often the bounce-rate, complaint-rate and list-bombing guards look "
        "at every app's recent outcomes.",
    )
    abuse_spike_check_every_seconds: float = Field(
        2.0,
        description="How often every app's rate over the last minute is compared with its "
        "baseline (a burst of 50 messages a second is caught within about 150).",
    )
    abuse_spike_factor: float = Field(
        10.0,
        ge=1,
        description="A spike: above this many times the app's (or tag's) baseline for the hour "
        "of the week …",
    )
    abuse_spike_floor_per_minute: float = Field(
        100.0,
        ge=1,
        description="… and above this many messages a minute, however small the baseline.",
    )
    abuse_spike_new_app_per_minute: float = Field(
        0.0,
        ge=0,
        description="An app (or tag) without any history in the last four weeks is a spike "
        "above this many messages a minute; 0: new apps are not judged (a first import or "
        "load test would look like one).",
    )
    abuse_bounce_rate: float = Field(
        0.10,
        ge=0,
        le=1,
        description="Hard-bounce rate above which an app's new mail is held (docs/abuse.md).",
    )
    abuse_bounce_min_deliveries: int = Field(
        200, ge=1, description="Fewest ended deliveries in the window for the bounce rate to count."
    )
    abuse_bounce_window_minutes: int = Field(
        60, ge=1, description="The bounce-rate and list-bombing guards' window."
    )
    abuse_complaint_rate: float = Field(
        0.003,
        ge=0,
        le=1,
        description="Complaint rate above which an app's new mail is held (the big mailbox "
        "providers' 0.3 %).",
    )
    abuse_complaint_min_deliveries: int = Field(
        1000, ge=1, description="Fewest deliveries in the window for the complaint rate to count."
    )
    abuse_complaint_window_hours: int = Field(
        24, ge=1, description="The complaint-rate guard's window (complaints come late)."
    )
    abuse_list_bombing_min_unknown: int = Field(
        50,
        ge=1,
        description="Fewest never-seen addresses unknown at one domain in the bounce window for "
        "the list-bombing guard to judge.",
    )
    abuse_list_bombing_unknown_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of an app's deliveries to one domain that are unknown never-seen "
        "addresses above which its new mail is held (list bombing).",
    )
    rspamd_url: str | None = Field(
        None,
        description="Base URL of an rspamd normal worker (e.g. `http://127.0.0.1:11333`): every "
        "message submitted or received is scored by its /checkv2 before it is accepted; unset, "
        "nothing is scanned (docs/abuse.md).",
    )
    rspamd_hold_score: float = Field(
        6.0,
        description="A message scoring at least this is accepted but held, with rspamd's "
        "symbols shown, until someone releases it (rspamd's own `add header` score).",
    )
    rspamd_reject_score: float = Field(
        15.0,
        description="A message scoring at least this is refused: SMTP 550 5.7.1, HTTP 422 "
        "(rspamd's own `reject` score; GTUBE scores it).",
    )
    rspamd_timeout: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Seconds an accept waits for rspamd's verdict before giving up on it.",
    )
    rspamd_fail_open: bool = Field(
        True,
        description="When rspamd does not answer in time (or errs): true accepts the message "
        'unscored, with a logged warning and `postbode_content_scans_total{result="error"}`; '
        "false answers SMTP 451 4.3.0 / HTTP 503 so the client retries.",
    )
    webhook_allow_private: str = Field(
        "",
        description="Private destinations webhooks may reach anyway: comma-separated CIDRs, "
        "addresses and host names (e.g. `10.1.2.0/24,hooks.corp.example`); every other "
        "loopback, private, link-local or reserved address is refused.",
    )
    tracking_bot_window_seconds: float = Field(
        10.0,
        ge=0,
        description="Opens and clicks this soon after delivery are counted as bots (scanners).",
    )

    tracking_click_window_seconds: float = Field(
        60.0,
        ge=0,
        description="A recipient's clicks on one link within this many seconds of the last "
        "one counted are kept as raw hits (event data `repeat: true`), neither counted nor "
        "sent to webhooks.",
    )

    # -- inbound ----------------------------------------------------------------------------
    inbound_concurrency: int = Field(
        10, ge=1, description="Inbound messages a worker process hands to their routes at once."
    )
    inbound_timeout: float = Field(
        30.0, gt=0, description="Seconds a route's endpoint has to answer one hand-off in full."
    )
    inbound_retry_cap_seconds: int = Field(
        3600, ge=1, description="Longest wait between hand-off attempts of one inbound message."
    )
    inbound_retry_window_seconds: int = Field(
        24 * 3600,
        ge=0,
        description="How long an inbound message is retried before it fails (it is kept, and "
        "can be replayed by hand).",
    )
    inbound_attachment_inline_bytes: int = Field(
        10 * 1024 * 1024,
        ge=0,
        description="Attachments up to this size travel in the hand-off as base64; larger "
        "ones as a signed link to `inbound_attachment_url`.",
    )
    inbound_attachment_url: str = Field(
        "http://127.0.0.1:8025",
        description="Public base URL of the web role, for signed links to large inbound "
        "attachments.",
    )
    inbound_attachment_link_seconds: int = Field(
        7 * 24 * 3600, ge=1, description="How long a signed attachment link stays valid."
    )

    # -- bounces ----------------------------------------------------------------------------
    bounce_rules_path: Path | None = Field(
        None,
        description="Bounce classification rules (TOML) used instead of the packaged rules.toml.",
    )
    bounce_max_message_size: int = Field(
        10 * 1024 * 1024,
        ge=1,
        description="Largest bounce or complaint taken at the return path, in bytes "
        "(larger ones are refused with 552 5.3.4).",
    )
    soft_bounce_categories: str = Field(
        "mailbox_full,mailbox_inactive",
        description="Comma-separated soft bounce categories that count towards suppressing "
        "an address (never `blocked`: a reputation block is not the recipient's fault).",
    )
    soft_bounce_suppress_count: int = Field(
        3,
        ge=0,
        description="Soft bounces of one address (sync or async, one app) within the window "
        "that suppress it; 0 disables the rule.",
    )
    soft_bounce_window_hours: int = Field(
        7 * 24,
        ge=1,
        description="The window, in hours, in which soft bounces of an address are counted.",
    )
    soft_bounce_suppress_days: int = Field(
        14, ge=0, description="How long, in days, repeated soft bounces keep an address suppressed."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in SQLAlchemy's spelling (psycopg 3 driver for PostgreSQL)."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'postbode.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def describe() -> list[tuple[str, str, str, str]]:
    """(env variable, type, default, description) for every setting, in schema order."""
    rows = []
    for name, field in Settings.model_fields.items():
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        default = field.default
        if isinstance(default, SecretStr):
            default = ""
        rows.append(
            (
                f"POSTBODE_{name.upper()}",
                annotation.replace("typing.", "").replace(" | ", " or "),
                "" if default is None else str(default),
                field.description or "",
            )
        )
    return rows
