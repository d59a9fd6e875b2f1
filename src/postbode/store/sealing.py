"""Secrets Postbode must be able to read back (the signing secrets of webhooks and inbound
routes), sealed at rest with AES-GCM under a key derived from the installation's secret key."""

from __future__ import annotations

import base64
import os
import weakref

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from postbode.store.engine import Store, installation_secret

# A 38-character `whsec_` secret seals to 91 characters: the columns (100) hold it as they are.
PREFIX = "s1:"
_INFO = b"postbode.store.signing-secrets"
_keys: weakref.WeakKeyDictionary[Store, bytes] = weakref.WeakKeyDictionary()


class SealError(ValueError):
    """A sealed value that this installation's key does not open (the secret key changed)."""


def derive_key(secret: bytes) -> bytes:
    """The 256-bit sealing key of an installation secret (HKDF-SHA256, its own purpose)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)


def seal_with(key: bytes, plaintext: str) -> str:
    """`s1:` and base64url(nonce ‖ ciphertext ‖ tag); a fresh random nonce each time."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), _INFO)
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal_with(key: bytes, value: str) -> str:
    """The plaintext of a sealed value; a value without the prefix is returned as it is (a row
    written by an older release before the migration sealed it)."""
    if not value.startswith(PREFIX):
        return value
    body = value[len(PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], _INFO).decode()
    except InvalidTag:
        raise SealError(
            "a stored signing secret cannot be opened: the installation's secret key changed "
            "since it was made (rotate the secret)"
        ) from None


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


def key_for(store: Store) -> bytes:
    """The store's sealing key (call it outside a write transaction: the first call on a new
    installation may store a generated secret key)."""
    found = _keys.get(store)
    if found is None:
        found = _keys[store] = derive_key(installation_secret(store))
    return found


def seal(store: Store, plaintext: str) -> str:
    return seal_with(key_for(store), plaintext)


def unseal(store: Store, value: str) -> str:
    return unseal_with(key_for(store), value)
