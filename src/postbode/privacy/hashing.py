"""Keyed hashes of e-mail addresses (HMAC-SHA256 with a key derived from the installation
secret): what retention and erasure leave where an address was, so a row still counts and a
suppressed address stays suppressed, while the address itself cannot be read back."""

from __future__ import annotations

import hashlib
import hmac
import re
import weakref

from postbode.store.engine import Store, installation_secret

PREFIX = "hmac:"  # a hashed address: PREFIX + 64 hex digits (never contains "@")
_PURPOSE = b"postbode/privacy/address-hash/v1"
_HASHED = re.compile(r"hmac:[0-9a-f]{64}")
_keys: weakref.WeakKeyDictionary[Store, bytes] = weakref.WeakKeyDictionary()


def derive_key(secret: bytes) -> bytes:
    """The address-hashing key: its own key, so it is never the key that signs sessions or
    tracking links (RFC 2104 §3: a key as long as the hash output)."""
    return hmac.new(secret, _PURPOSE, hashlib.sha256).digest()


def address_key(store: Store) -> bytes:
    """The store's address-hashing key (call it outside write transactions: the first call
    may store a generated installation secret)."""
    key = _keys.get(store)
    if key is None:
        key = _keys[store] = derive_key(installation_secret(store))
    return key


def normalise(address: str) -> str:
    """An address as it is hashed and compared: trimmed, without angle brackets, lower case
    (the suppression list's form)."""
    return address.strip().strip("<>").strip().lower().rstrip(".")


def hash_address(key: bytes, address: str) -> str:
    """The keyed hash of an address: the same for every spelling `normalise` folds together."""
    digest = hmac.new(key, normalise(address).encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest


def is_hashed(value: str | None) -> bool:
    """Whether a stored value is a hash left by retention or erasure."""
    return value is not None and _HASHED.fullmatch(value) is not None
