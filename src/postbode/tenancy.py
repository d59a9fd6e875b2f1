"""Organizations, apps, their credentials and sending domains, and the users who manage them."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import string
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import Connection, delete, func, insert, select, update

from postbode.store.engine import Store
from postbode.store.schema import (
    apps,
    credentials,
    domains,
    memberships,
    organization_tokens,
    organizations,
    users,
    utcnow,
)

DEFAULT_ORGANIZATION = "default"
ROLES = ("owner", "admin", "viewer")
RETURN_PATH_LABEL = "pb-bounces"  # pb-bounces.<domain> CNAMEs to Postbode's return-path domain
API_KEY_PREFIX = "pb_"

_hasher = PasswordHasher()


class TenancyError(ValueError):
    """A request about apps, users or domains that cannot be carried out (named reason)."""


# -- organizations and apps -------------------------------------------------------------------


def ensure_organization(conn: Connection, name: str = DEFAULT_ORGANIZATION) -> int:
    """The id of the organization called `name`, created if missing."""
    org_id = conn.execute(select(organizations.c.id).where(organizations.c.name == name)).scalar()
    if org_id is None:
        org_id = conn.execute(
            insert(organizations).values(name=name).returning(organizations.c.id)
        ).scalar_one()
    return int(org_id)


@dataclass(frozen=True)
class NewApp:
    """An app just created, with the secrets that are shown this once."""

    app_id: int
    name: str
    api_key: str
    smtp_username: str
    smtp_password: str

    def as_contract(self) -> dict[str, str]:
        return {
            "app": self.name,
            "api_key": self.api_key,
            "smtp_username": self.smtp_username,
            "smtp_password": self.smtp_password,
        }


def _check_name(name: str) -> str:
    allowed = set(string.ascii_lowercase + string.digits + "-_")
    if not name or len(name) > 100 or not set(name) <= allowed:
        raise TenancyError(
            f"invalid app name {name!r}: use 1-100 lower-case letters, digits, '-' or '_'"
        )
    return name


def create_app(store: Store, name: str, organization: str = DEFAULT_ORGANIZATION) -> NewApp:
    """Create an app with one API key and one SMTP credential. App names are unique within
    their organisation; another organisation's apps do not matter (nor are they told)."""
    _check_name(name)
    with store.write() as conn:
        org_id = ensure_organization(conn, organization)
        if conn.execute(
            select(apps.c.id).where(apps.c.organization_id == org_id, apps.c.name == name)
        ).first():
            raise TenancyError(f"an app named {name!r} already exists")
        # a new app starts with its organization's retention defaults (privacy/retention.py)
        raw_days, metadata_days = conn.execute(
            select(
                organizations.c.raw_retention_days, organizations.c.metadata_retention_days
            ).where(organizations.c.id == org_id)
        ).one()
        app_id = conn.execute(
            insert(apps)
            .values(
                organization_id=org_id,
                name=name,
                raw_retention_days=raw_days,
                metadata_retention_days=metadata_days,
            )
            .returning(apps.c.id)
        ).scalar_one()
        api_key = _create_api_key(conn, app_id, "default")
        username, password = _create_smtp_credential(conn, app_id, name, "default")
    return NewApp(app_id, name, api_key, username, password)


# Which organisation an app name is read in: its name, its id, or None (any, if only one
# organisation has an app of that name: the operator's command line).
Organization = str | int | None


class AmbiguousApp(TenancyError):
    """Several organisations have an app of the name, and none was named."""


def app_by_name(conn: Connection, name: str, organization: Organization = None) -> dict[str, Any]:
    """The app called `name` in `organization`. Without an organisation, the one app of that
    name in the installation, and AmbiguousApp when several organisations have one (only
    the operator looks apps up that way: every other caller names its organisation)."""
    query = select(apps).where(apps.c.name == name)
    if isinstance(organization, int):
        query = query.where(apps.c.organization_id == organization)
    elif organization is not None:
        query = query.join(organizations, organizations.c.id == apps.c.organization_id).where(
            organizations.c.name == organization
        )
    rows = conn.execute(query.limit(2)).mappings().all()
    if not rows:
        where = f" in organization {organization!r}" if isinstance(organization, str) else ""
        raise TenancyError(f"no app named {name!r}{where}")
    if len(rows) > 1:
        raise AmbiguousApp(
            f"several organizations have an app named {name!r}: name one with --org "
            "(`postbode app list` shows each app's organization)"
        )
    return dict(rows[0])


def list_apps(store: Store) -> list[dict[str, Any]]:
    """Every app with its organization and counts of credentials and domains."""
    with store.read() as conn:
        n_domains = select(func.count()).where(domains.c.app_id == apps.c.id).scalar_subquery()
        n_creds = (
            select(func.count())
            .where(credentials.c.app_id == apps.c.id, credentials.c.revoked_at.is_(None))
            .scalar_subquery()
        )
        rows = conn.execute(
            select(
                apps.c.id,
                apps.c.name,
                organizations.c.name.label("organization"),
                apps.c.status,
                apps.c.hold_reason,
                n_domains.label("domains"),
                n_creds.label("credentials"),
                apps.c.created_at,
            )
            .join(organizations, organizations.c.id == apps.c.organization_id)
            .order_by(apps.c.name)
        ).mappings()
        return [dict(r) for r in rows]


# -- credentials ------------------------------------------------------------------------------


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _create_api_key(conn: Connection, app_id: int, name: str) -> str:
    # API keys carry 192 random bits, so a fast hash is enough (unlike passwords).
    lookup = secrets.token_hex(6)
    secret = secrets.token_urlsafe(24)
    conn.execute(
        insert(credentials).values(
            app_id=app_id, kind="api", name=name, lookup=lookup, secret_hash=_sha256(secret)
        )
    )
    return f"{API_KEY_PREFIX}{lookup}_{secret}"


def _create_smtp_credential(
    conn: Connection, app_id: int, app_name: str, name: str
) -> tuple[str, str]:
    username = f"{app_name}-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(18)
    conn.execute(
        insert(credentials).values(
            app_id=app_id,
            kind="smtp",
            name=name,
            lookup=username,
            secret_hash=_hasher.hash(password),
        )
    )
    return username, password


def create_credential(
    store: Store, app_name: str, kind: str, name: str = "", *, organization: Organization = None
) -> dict[str, Any]:
    """A new API key or SMTP login for the app; its secret is in the result, and nowhere else."""
    with store.write() as conn:
        app = app_by_name(conn, app_name, organization)
        if kind == "api":
            key = _create_api_key(conn, app["id"], name)
            lookup = key[len(API_KEY_PREFIX) :].split("_", 1)[0]
            secret = {"api_key": key}
        elif kind == "smtp":
            lookup, password = _create_smtp_credential(conn, app["id"], app["name"], name)
            secret = {"smtp_username": lookup, "smtp_password": password}
        else:
            raise TenancyError(f"unknown credential kind {kind!r}: use 'api' or 'smtp'")
        cred_id = conn.execute(
            select(credentials.c.id).where(credentials.c.lookup == lookup)
        ).scalar_one()
    return {"id": cred_id, "app": app_name, "kind": kind, "name": name, **secret}


def revoke_credential(store: Store, credential_id: int, app_id: int | None = None) -> None:
    """Revoke a credential (of `app_id`, when given): at once in this process, within
    API_KEY_CACHE_SECONDS in others."""
    stmt = update(credentials).where(
        credentials.c.id == credential_id, credentials.c.revoked_at.is_(None)
    )
    if app_id is not None:
        stmt = stmt.where(credentials.c.app_id == app_id)
    with store.write() as conn:
        if conn.execute(stmt.values(revoked_at=utcnow())).rowcount != 1:
            raise TenancyError(f"no active credential with id {credential_id}")
    _api_keys.clear()  # this process forgets at once; others within API_KEY_CACHE_SECONDS


def list_credentials(
    store: Store, app_name: str, *, organization: Organization = None
) -> list[dict[str, Any]]:
    with store.read() as conn:
        app = app_by_name(conn, app_name, organization)
        rows = conn.execute(
            select(
                credentials.c.id,
                credentials.c.kind,
                credentials.c.name,
                credentials.c.lookup,
                credentials.c.created_at,
                credentials.c.last_used_at,
                credentials.c.revoked_at,
                credentials.c.limit_per_minute,
                credentials.c.limit_per_hour,
                credentials.c.limit_per_day,
            )
            .where(credentials.c.app_id == app["id"])
            .order_by(credentials.c.id)
        ).mappings()
        return [dict(r) for r in rows]


API_KEY_CACHE_SECONDS = 5.0
_api_keys: dict[str, tuple[int, float]] = {}  # sha256 of a key -> (app id, valid until)


def authenticate_api_key(store: Store, key: str) -> int | None:
    """The app id an API key belongs to, or None for a wrong, malformed or revoked key.

    A key that checked out is remembered for a few seconds (the API's hot path reads the
    store once per key, not once per request); a revocation in another process takes effect
    within API_KEY_CACHE_SECONDS."""
    cached = recently_authenticated(key)
    if cached is not None:
        return cached
    digest = _sha256(key)
    app_id = _check_api_key(store, key)
    if app_id is not None:
        if len(_api_keys) > 10_000:
            _api_keys.clear()
        _api_keys[digest] = (app_id, time.monotonic() + API_KEY_CACHE_SECONDS)
    return app_id


def recently_authenticated(key: str) -> int | None:
    """The app id of an API key this process authenticated in the last few seconds (and did
    not see revoked since), without reading the store; None otherwise."""
    cached = _api_keys.get(_sha256(key))
    return cached[0] if cached is not None and cached[1] > time.monotonic() else None


def _check_api_key(store: Store, key: str) -> int | None:
    if not key.startswith(API_KEY_PREFIX) or "_" not in key[len(API_KEY_PREFIX) :]:
        return None
    lookup, secret = key[len(API_KEY_PREFIX) :].split("_", 1)
    with store.read() as conn:
        row = conn.execute(
            select(credentials.c.app_id, credentials.c.secret_hash).where(
                credentials.c.lookup == lookup,
                credentials.c.kind == "api",
                credentials.c.revoked_at.is_(None),
            )
        ).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _sha256(secret)):
        return None
    return int(row.app_id)


class _VerifiedCache:
    """Remembers recent successful argon2 checks, so a client that sends one message per
    connection does not cost an argon2 hash each time (revocation is still read from the store)."""

    def __init__(self, ttl: float = 300.0) -> None:
        self._ttl = ttl
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def hit(self, stored_hash: str, password: str) -> bool:
        key = (stored_hash, _sha256(password))
        with self._lock:
            until = self._seen.get(key)
            return until is not None and until > time.monotonic()

    def add(self, stored_hash: str, password: str) -> None:
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen[(stored_hash, _sha256(password))] = time.monotonic() + self._ttl


_smtp_verified = _VerifiedCache()


class NeedsHashing(Exception):
    """authenticate_smtp was told not to hash, and the password is not one it checked lately."""


def authenticate_smtp(
    store: Store, username: str, password: str, *, may_hash: bool = True
) -> int | None:
    """The app id an SMTP login belongs to, or None. An unknown or revoked user name costs
    the same argon2 check as a wrong password, so the reply time does not tell them apart.
    With `may_hash` false, only a password verified lately (no hashing) is answered; any
    other attempt raises NeedsHashing (the caller is throttling)."""
    with store.read() as conn:
        row = conn.execute(
            select(credentials.c.app_id, credentials.c.secret_hash).where(
                credentials.c.lookup == username,
                credentials.c.kind == "smtp",
                credentials.c.revoked_at.is_(None),
            )
        ).first()
    if row is not None and _smtp_verified.hit(row.secret_hash, password):
        return int(row.app_id)
    if not may_hash:
        raise NeedsHashing
    try:
        _hasher.verify(row.secret_hash if row is not None else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:  # pragma: no cover - the dummy hash's password is random
        return None
    _smtp_verified.add(row.secret_hash, password)
    return int(row.app_id)


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, made with the parameters real ones have."""
    return _hasher.hash(secrets.token_urlsafe(24))


# -- sending domains --------------------------------------------------------------------------


def generate_dkim_key(bits: int = 2048) -> tuple[str, str]:
    """A new RSA key: (private key PEM, the DKIM TXT value `v=DKIM1; k=rsa; p=…`)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode()}"


def _domain_problem(name: str) -> str:
    """Why `name` is not a domain name, in words (RFC 1035 §2.3.4: labels of 1-63 octets)."""
    labels = name.split(".")
    if not name:
        return "it is empty"
    if any(not label for label in labels):
        return "it has an empty label (two dots in a row, or a dot at the start)"
    if any(len(label) > 63 for label in labels):
        return "a label is longer than 63 characters"
    if len(labels) < 2:
        return "it needs at least two labels, like example.com"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return "a label starts or ends with a hyphen"
    if len(name) > 253:
        return "it is longer than 253 characters"
    return "it is not a valid internationalised domain name"


def _check_domain(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    try:
        ascii_name = name.encode("idna").decode()
    except UnicodeError:
        raise TenancyError(f"invalid domain {name!r}: {_domain_problem(name)}") from None
    labels = ascii_name.split(".")
    if (
        len(labels) < 2
        or len(ascii_name) > 253
        or any(
            not label or len(label) > 63 or label.startswith("-") or label.endswith("-")
            for label in labels
        )
    ):
        raise TenancyError(f"invalid domain {name!r}: {_domain_problem(ascii_name)}")
    return ascii_name


def add_domain(
    store: Store,
    app_name: str,
    name: str,
    *,
    inbound: bool = False,
    organization: Organization = None,
) -> dict[str, Any]:
    """Claim a sending domain for an app, with a new 2048-bit DKIM key under a selector of its
    own. `inbound`: it also takes mail for the app's routes (a domain the app has already is
    switched to inbound).

    Any app may claim any name, whoever else claimed it: the claim holds the name once its
    own DKIM record is found in DNS (dnscheck), and at most one claim of a name holds it.
    So the answer is the same whether another organisation claimed the name or not."""
    name = _check_domain(name)
    private_pem, public_txt = generate_dkim_key()
    selector = f"pb{secrets.token_hex(3)}"
    with store.write() as conn:
        app = app_by_name(conn, app_name, organization)
        claims = conn.execute(
            select(domains.c.id, domains.c.app_id, apps.c.name.label("app"))
            .join(apps, apps.c.id == domains.c.app_id)
            .where(domains.c.name == name, apps.c.organization_id == app["organization_id"])
        ).all()
        own = next((c for c in claims if c.app_id == app["id"]), None)
        if own is not None and inbound:
            conn.execute(update(domains).where(domains.c.id == own.id).values(inbound=True))
            return dict(
                conn.execute(select(domains).where(domains.c.id == own.id)).mappings().one()
            )
        if own is not None:
            raise TenancyError(f"domain {name!r} is already registered")
        if claims:  # another app of the same organisation: telling it tells nobody else
            raise TenancyError(f"domain {name!r} is already registered to app {claims[0].app!r}")
        domain_id = conn.execute(
            insert(domains)
            .values(
                app_id=app["id"],
                name=name,
                dkim_selector=selector,
                dkim_private_key=private_pem,
                dkim_public_key=public_txt,
                inbound=inbound,
            )
            .returning(domains.c.id)
        ).scalar_one()
        row = conn.execute(select(domains).where(domains.c.id == domain_id)).mappings().one()
    return dict(row)


def holders(claims: Iterable[Any], *, allow_unverified: bool) -> dict[str, Any]:
    """The claim that holds each name, of `claims` (rows with name, app_id, verified_at): the
    verified one; with `allow_unverified` (development), the only claim of a name no claim
    has verified. A name several apps claim and none verified is nobody's."""
    by_name: dict[str, list[Any]] = {}
    for claim in claims:
        by_name.setdefault(str(claim.name).lower(), []).append(claim)
    held: dict[str, Any] = {}
    for name, found in by_name.items():
        verified = [c for c in found if c.verified_at is not None]
        if verified:
            held[name] = verified[0]
        elif allow_unverified and len(found) == 1:
            held[name] = found[0]
    return held


def domain_holders(
    conn: Connection, *, allow_unverified: bool, inbound_only: bool = False
) -> dict[str, int]:
    """{name: app id} of every domain name held (`holders`): the app whose mail, bounces and
    inbound mail the name stands for. `inbound_only`: names whose holder takes inbound mail."""
    rows = conn.execute(
        select(domains.c.name, domains.c.app_id, domains.c.verified_at, domains.c.inbound)
    ).all()
    return {
        name: int(row.app_id)
        for name, row in holders(rows, allow_unverified=allow_unverified).items()
        if row.inbound or not inbound_only
    }


def verified_elsewhere(conn: Connection, name: str, app_id: int) -> dict[str, Any] | None:
    """The verified claim of `name` by another app than `app_id`, with its app and
    organisation names (for the operator), or None."""
    row = (
        conn.execute(
            select(
                domains.c.id,
                domains.c.app_id,
                apps.c.name.label("app"),
                organizations.c.name.label("organization"),
            )
            .join(apps, apps.c.id == domains.c.app_id)
            .join(organizations, organizations.c.id == apps.c.organization_id)
            .where(
                domains.c.name == name,
                domains.c.app_id != app_id,
                domains.c.verified_at.is_not(None),
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def inbound_records(domain: dict[str, Any], smtp_hostname: str) -> list[dict[str, str]]:
    """The record that sends a domain's mail to Postbode's SMTP listener (RFC 5321 §5.1)."""
    return [
        {
            "purpose": "inbound",
            "type": "MX",
            "name": domain["name"],
            "value": f"10 {smtp_hostname}.",
        }
    ]


def dns_records(
    domain: dict[str, Any], smtp_hostname: str, return_path_domain: str
) -> list[dict[str, str]]:
    """The DNS records an operator publishes for a sending domain."""
    name = domain["name"]
    return [
        {
            "purpose": "spf",
            "type": "TXT",
            "name": name,
            "value": f"v=spf1 a:{smtp_hostname} ~all",
        },
        {
            "purpose": "dkim",
            "type": "TXT",
            "name": f"{domain['dkim_selector']}._domainkey.{name}",
            "value": domain["dkim_public_key"],
        },
        *_previous_dkim(domain),
        {
            "purpose": "return_path",
            "type": "CNAME",
            "name": f"{RETURN_PATH_LABEL}.{name}",
            "value": return_path_domain,
        },
        # Bounces go to <token>@<return-path domain> (RFC 5321 §4.5.5), so that domain must
        # take mail at Postbode: one record for every sending domain, published once.
        {
            "purpose": "return_path_mx",
            "type": "MX",
            "name": return_path_domain.strip().rstrip(".").lower(),
            "value": f"10 {smtp_hostname}.",
        },
        {
            "purpose": "dmarc",
            "type": "TXT",
            "name": f"_dmarc.{name}",
            "value": f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{name}",
        },
    ]


def _previous_dkim(domain: dict[str, Any]) -> list[dict[str, str]]:
    """The rotated-out DKIM key's record, while its grace period lasts."""
    until = domain.get("previous_dkim_until")
    if not (until and domain.get("previous_dkim_selector") and until > utcnow()):
        return []
    return [
        {
            "purpose": "dkim_previous",
            "type": "TXT",
            "name": f"{domain['previous_dkim_selector']}._domainkey.{domain['name']}",
            "value": domain["previous_dkim_public_key"],
        }
    ]


# -- users -------------------------------------------------------------------------------------


def create_user(
    store: Store,
    email: str,
    password: str,
    *,
    role: str = "viewer",
    admin: bool = False,
    organization: str = DEFAULT_ORGANIZATION,
) -> int:
    """A web user with a role in the organization (`admin=True`: an owner who runs Postbode)."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise TenancyError(f"invalid e-mail address {email!r}")
    if len(password) < 8:
        raise TenancyError("password too short: use at least 8 characters")
    if role not in ROLES:
        raise TenancyError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    with store.write() as conn:
        if conn.execute(select(users.c.id).where(users.c.email == email)).first():
            raise TenancyError(f"a user {email!r} already exists")
        org_id = ensure_organization(conn, organization)
        user_id = conn.execute(
            insert(users)
            .values(email=email, password_hash=_hasher.hash(password), is_admin=admin)
            .returning(users.c.id)
        ).scalar_one()
        conn.execute(
            insert(memberships).values(
                user_id=user_id, organization_id=org_id, role="owner" if admin else role
            )
        )
    return int(user_id)


def set_password(store: Store, user_id: int, password: str) -> str:
    """Give a user a new password; returns its hash."""
    if len(password) < 8:
        raise TenancyError("password too short: use at least 8 characters")
    hashed = _hasher.hash(password)
    with store.write() as conn:
        conn.execute(update(users).where(users.c.id == user_id).values(password_hash=hashed))
    return hashed


def verify_user(store: Store, email: str, password: str) -> int | None:
    """The user id for a correct e-mail and password, or None."""
    with store.read() as conn:
        row = conn.execute(
            select(users.c.id, users.c.password_hash).where(users.c.email == email.lower())
        ).first()
    if row is None:
        _hasher.hash(password)  # the same cost either way: no user enumeration by timing
        return None
    try:
        _hasher.verify(row.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return int(row.id)


# -- organisation tokens (the management API) ---------------------------------------------------

ORG_TOKEN_PREFIX = "pbo_"  # noqa: S105 (a prefix, not a secret)


def create_org_token(
    store: Store, organization: str = DEFAULT_ORGANIZATION, name: str = ""
) -> dict[str, Any]:
    """A new management token of the organization (created if missing): the token itself is
    in the result and nowhere else; only its SHA-256 is stored."""
    if len(name) > 100:
        raise TenancyError("a token name is at most 100 characters")
    lookup = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    with store.write() as conn:
        org_id = ensure_organization(conn, organization)
        token_id = conn.execute(
            insert(organization_tokens)
            .values(organization_id=org_id, name=name, lookup=lookup, secret_hash=_sha256(secret))
            .returning(organization_tokens.c.id)
        ).scalar_one()
    return {
        "id": int(token_id),
        "organization": organization,
        "name": name,
        "token": f"{ORG_TOKEN_PREFIX}{lookup}_{secret}",
    }


@dataclass(frozen=True)
class OrgToken:
    """Who calls the management API: a token of one organization."""

    id: int
    organization_id: int
    name: str

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        return f"token:{self.id}" + (f" ({self.name})" if self.name else "")


def authenticate_org_token(store: Store, token: str) -> OrgToken | None:
    """The organisation token `token` is, or None for a wrong, malformed or revoked one (an
    app's API key is never one: it cannot manage anything)."""
    if not token.startswith(ORG_TOKEN_PREFIX) or "_" not in token[len(ORG_TOKEN_PREFIX) :]:
        return None
    lookup, secret = token[len(ORG_TOKEN_PREFIX) :].split("_", 1)
    t = organization_tokens
    with store.read() as conn:
        row = conn.execute(
            select(t.c.id, t.c.organization_id, t.c.name, t.c.secret_hash).where(
                t.c.lookup == lookup, t.c.revoked_at.is_(None)
            )
        ).first()
    if row is None or not hmac.compare_digest(row.secret_hash, _sha256(secret)):
        return None
    return OrgToken(int(row.id), int(row.organization_id), row.name)


def list_org_tokens(store: Store, organization_id: int) -> list[dict[str, Any]]:
    t = organization_tokens
    with store.read() as conn:
        rows = conn.execute(
            select(t.c.id, t.c.name, t.c.lookup, t.c.created_at, t.c.revoked_at)
            .where(t.c.organization_id == organization_id)
            .order_by(t.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def revoke_org_token(store: Store, organization_id: int, token_id: int) -> None:
    """Revoke a token of the organization: it stops working with the next request."""
    t = organization_tokens
    with store.write() as conn:
        changed = conn.execute(
            update(t)
            .where(
                t.c.id == token_id,
                t.c.organization_id == organization_id,
                t.c.revoked_at.is_(None),
            )
            .values(revoked_at=utcnow())
        ).rowcount
    if changed != 1:
        raise TenancyError(f"no active token with id {token_id}")


def organization_id(store: Store, name: str) -> int:
    with store.read() as conn:
        found = conn.execute(
            select(organizations.c.id).where(organizations.c.name == name)
        ).scalar()
    if found is None:
        raise TenancyError(f"no organization named {name!r}")
    return int(found)


# -- apps: settings and suspension ----------------------------------------------------------

APP_SETTINGS = (
    "track_opens",
    "track_clicks",
    "max_message_age_seconds",
    "raw_retention_days",
    "metadata_retention_days",
)


def update_app(
    store: Store, app_name: str, *, organization: Organization = None, **changes: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change an app's settings (APP_SETTINGS) or status (`active` | `suspended`); returns
    the app after the change and what changed ({field: [before, after]})."""
    unknown = set(changes) - {*APP_SETTINGS, "status"}
    if unknown:
        raise TenancyError(f"unknown app settings: {', '.join(sorted(unknown))}")
    if "status" in changes and changes["status"] not in ("active", "suspended"):
        raise TenancyError("status is active or suspended")
    with store.write() as conn:
        before = app_by_name(conn, app_name, organization)
        values = {k: v for k, v in changes.items() if before[k] != v}
        if values:
            conn.execute(update(apps).where(apps.c.id == before["id"]).values(**values))
        after = app_by_name(conn, app_name, before["organization_id"])
    return after, {k: [before[k], after[k]] for k in values}


# -- DKIM key rotation ------------------------------------------------------------------------

DKIM_GRACE_DAYS = 7


def rotate_dkim(
    store: Store,
    domain_name: str,
    *,
    app_id: int,
    grace_days: float = DKIM_GRACE_DAYS,
) -> dict[str, Any]:
    """A new DKIM key under a new selector signs the domain's mail from now on; the previous
    key stays in the DNS records (and should stay published) for `grace_days`, so mail
    signed with it before the rotation still verifies. Rotating again within the grace
    period retires the older key at once. Returns the domain row after the change."""
    if not 0 <= grace_days <= 90:
        raise TenancyError("the grace period is 0 to 90 days")
    private_pem, public_txt = generate_dkim_key()
    name = _check_domain(domain_name)
    with store.write() as conn:
        row = (
            conn.execute(select(domains).where(domains.c.name == name, domains.c.app_id == app_id))
            .mappings()
            .first()
        )
        if row is None:
            raise TenancyError(f"no domain {name!r}")
        selector = row["dkim_selector"]
        while selector in (row["dkim_selector"], row["previous_dkim_selector"]):
            selector = f"pb{secrets.token_hex(3)}"
        conn.execute(
            update(domains)
            .where(domains.c.id == row["id"])
            .values(
                dkim_selector=selector,
                dkim_private_key=private_pem,
                dkim_public_key=public_txt,
                previous_dkim_selector=row["dkim_selector"],
                previous_dkim_public_key=row["dkim_public_key"],
                previous_dkim_until=utcnow() + timedelta(days=grace_days),
            )
        )
        return dict(conn.execute(select(domains).where(domains.c.id == row["id"])).mappings().one())


# -- users and roles ---------------------------------------------------------------------------


def list_members(store: Store, organization_id: int) -> list[dict[str, Any]]:
    """The organization's users with their roles."""
    with store.read() as conn:
        rows = conn.execute(
            select(
                users.c.id,
                users.c.email,
                memberships.c.role,
                users.c.last_login_at,
                memberships.c.created_at,
            )
            .join(memberships, memberships.c.user_id == users.c.id)
            .where(memberships.c.organization_id == organization_id)
            .order_by(users.c.email)
        ).mappings()
        return [dict(r) for r in rows]


def set_role(store: Store, organization_id: int, user_id: int, role: str) -> dict[str, Any]:
    """Change a member's role; the last owner cannot stop being one."""
    if role not in ROLES:
        raise TenancyError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    m = memberships
    with store.write() as conn:
        current = conn.execute(
            select(m.c.role).where(m.c.user_id == user_id, m.c.organization_id == organization_id)
        ).scalar()
        if current is None:
            raise TenancyError(f"no user {user_id} in this organization")
        if current == "owner" and role != "owner":
            _keep_an_owner(conn, organization_id, user_id)
        conn.execute(
            update(m)
            .where(m.c.user_id == user_id, m.c.organization_id == organization_id)
            .values(role=role)
        )
    return {"id": user_id, "role": role, "previous_role": current}


def remove_member(store: Store, organization_id: int, user_id: int) -> None:
    """Take a user out of the organization (the last owner stays)."""
    m = memberships
    with store.write() as conn:
        current = conn.execute(
            select(m.c.role).where(m.c.user_id == user_id, m.c.organization_id == organization_id)
        ).scalar()
        if current is None:
            raise TenancyError(f"no user {user_id} in this organization")
        if current == "owner":
            _keep_an_owner(conn, organization_id, user_id)
        conn.execute(
            delete(m).where(m.c.user_id == user_id, m.c.organization_id == organization_id)
        )


def _keep_an_owner(conn: Connection, organization_id: int, leaving: int) -> None:
    m = memberships
    others = conn.execute(
        select(func.count()).where(
            m.c.organization_id == organization_id, m.c.role == "owner", m.c.user_id != leaving
        )
    ).scalar_one()
    if not others:
        raise TenancyError("the organization's last owner must stay an owner")
