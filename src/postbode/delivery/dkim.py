"""DKIM signing of outgoing messages (RFC 6376) and DKIM key pair generation."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from typing import Any

import dkim
import dkim.canonicalization
import idna
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

__all__ = [
    "SIGNED_HEADERS",
    "DkimError",
    "generate_keypair",
    "sign",
    "split_txt",
]

SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
"""Header fields signed when present (RFC 6376 §5.4.1 recommends these)."""

# RFC 6376 §5.4.2: naming a field once more than it occurs ("oversigning") makes the
# verifier hash an empty instance, so a From added later breaks the signature.
_OVERSIGNED = frozenset({"from"})


class DkimError(ValueError):
    """The message or key cannot be signed (no From header, unreadable key, ...)."""


class _ParsedKey(dict[str, int]):
    """dkimpy's parsed RSA private key (its dict of RFC 8017 numbers), carrying the OpenSSL
    key object made from those numbers."""

    openssl: rsa.RSAPrivateKey


_NUMBERS = (
    "modulus",
    "publicExponent",
    "privateExponent",
    "prime1",
    "prime2",
    "exponent1",
    "exponent2",
    "coefficient",
)

_parse_pem_private_key = dkim.parse_pem_private_key


@functools.lru_cache(maxsize=256)
def _parsed_key(private_key_pem: bytes) -> _ParsedKey:
    """A key parsed once per key material: dkimpy parses the PEM with its pure-Python ASN.1
    reader (about 0.5 ms) for every message it signs. Unreadable keys raise every time."""
    key = _ParsedKey(_parse_pem_private_key(private_key_pem))
    key.openssl = _openssl_key(key)
    return key


def _openssl_key(private_key: dict[str, int]) -> rsa.RSAPrivateKey:
    n, e, d, p, q, dmp1, dmq1, iqmp = (private_key[k] for k in _NUMBERS)
    public = rsa.RSAPublicNumbers(e, n)
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public).private_key()


_pure_python_sign = dkim.RSASSA_PKCS1_v1_5_sign


def _rsassa_pkcs1_v1_5_sign(hash: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSA step, done by OpenSSL: dkimpy computes the signature in pure Python, at
    6-7 ms of CPU per message against under 1 ms here (the digest and result are the same)."""
    if getattr(hash, "name", "") != "sha256":
        return _pure_python_sign(hash, private_key)  # type: ignore[no-any-return]
    key = private_key.openssl if isinstance(private_key, _ParsedKey) else _openssl_key(private_key)
    return key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


# dkimpy looks both functions up in its own namespace when it signs.
dkim.RSASSA_PKCS1_v1_5_sign = _rsassa_pkcs1_v1_5_sign
dkim.parse_pem_private_key = _parsed_key


# dkimpy's text passes run a regular expression over the whole message every time, though a
# typical message has nothing for them to change. The versions below skip a pass when its
# pattern cannot match (or do it without a regular expression) and run dkimpy's own otherwise,
# so their results are the same bytes (tested against dkimpy's); dkimpy looks them up in its
# modules' namespaces at each call.
_strip_trailing_whitespace = dkim.canonicalization.strip_trailing_whitespace
_compress_whitespace = dkim.canonicalization.compress_whitespace
_unfold_header_value = dkim.canonicalization.unfold_header_value
_rfc822_parse = dkim.rfc822_parse


def _fast_strip_trailing_whitespace(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _strip_trailing_whitespace(content)  # type: ignore[no-any-return]


def _fast_compress_whitespace(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content
    return _compress_whitespace(content)  # type: ignore[no-any-return]


def _fast_unfold_header_value(content: bytes) -> bytes:
    # re.sub(b"\r?\n", b"", ...): every LF goes, with the CR right before it if any
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


# The end of the header section: an empty first line, or a line ending followed by another.
_HEADER_END = re.compile(rb"\A\r?\n|\n\r?\n")


def _fast_rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's rfc822_parse, which splits the whole message into lines with a regular
    expression and joins the body again with CRLF: here only the header section is split,
    and the body is converted only when it has a bare LF."""
    end = _HEADER_END.search(message)
    if end is None:  # no body: nothing to save
        return _rfc822_parse(message)  # type: ignore[no-any-return]
    # the header lines with the line end of the last one; none when the first line is empty
    head = message[: end.start() + 1] if end.group().startswith(b"\n") else b""
    body = message[end.end() :]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = re.sub(rb"\r?\n", b"\r\n", body)
    headers = _rfc822_parse(head)[0] if head else []
    return headers, body


dkim.canonicalization.strip_trailing_whitespace = _fast_strip_trailing_whitespace
dkim.canonicalization.compress_whitespace = _fast_compress_whitespace
dkim.canonicalization.unfold_header_value = _fast_unfold_header_value
dkim.rfc822_parse = _fast_rfc822_parse


def sign(message: bytes, domain: str, selector: str, private_key_pem: bytes) -> bytes:
    """The message with a DKIM-Signature header field prepended.

    rsa-sha256, relaxed/relaxed canonicalization (RFC 6376 §3.4), signing every
    SIGNED_HEADERS field present as often as it occurs, and From once more.

    The steps of dkimpy's `DKIM.sign` (with its own helpers for parsing, canonicalization,
    header selection and folding), minus its per-message set-up and the canonicalization of
    header fields that are not signed: the same bytes, tested against dkimpy's own.
    """
    if not domain or not selector:
        raise DkimError("DKIM domain and selector must not be empty")
    linesep = b"\r\n" if b"\r\n" in message else b"\n"
    try:
        headers, body = _fast_rfc822_parse(message) if message else ([], b"")
        include = [name.lower() for name, _ in headers if name.lower() in _WANTED]
        if b"from" not in include:
            raise DkimError("message has no From header field (RFC 6376 §5.4 requires it)")
        include += [name for name in _OVERSIGNED_BYTES if name in include]
        s_tag = selector.encode("ascii")
        d_tag = _a_label(domain).encode("ascii")
        try:
            key = _parsed_key(private_key_pem)
        except (dkim.UnparsableKeyError, ValueError) as exc:  # binascii.Error: broken base64
            raise dkim.KeyFormatError(f"unusable private key: {exc}") from exc
        relaxed = dkim.canonicalization.Relaxed
        body_hash = base64.b64encode(hashlib.sha256(relaxed.canonicalize_body(body)).digest())
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", b"relaxed/relaxed"),
            (b"d", d_tag),
            (b"i", b"@" + d_tag),
            (b"q", b"dns/txt"),
            (b"s", s_tag),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # dkimpy's placeholder, so that b= folds onto a line of its own
            (b"b", b"0" * 60),
        ]
        value: bytes = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=_NAMELEN)
        value = dkim.RE_BTAG.sub(b"\\1", value)
        # RFC 6376 §3.7: the signed fields (canonicalized), then this field with b= empty
        # and without its final CRLF.
        h = hashlib.sha256()
        for name, text in relaxed.canonicalize_headers(dkim.select_headers(headers, include)):
            h.update(name + b":" + text)
        ((name, text),) = relaxed.canonicalize_headers(
            [(_SIGNATURE, dkim.RE_BTAG.sub(b"\\1", b" " + value))]
        )
        h.update(name + b":" + text.rstrip())
        signature = key.openssl.sign(
            h.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
        fields[-1] = (b"b", base64.b64encode(signature))
        value = b"; ".join(b"=".join(f) for f in fields) + linesep
        value = dkim.fold(value, namelen=_NAMELEN, linesep=linesep)
    except dkim.DKIMException as exc:
        raise DkimError(f"DKIM signing failed: {exc}") from exc
    except (UnicodeError, idna.IDNAError) as exc:
        raise DkimError(f"DKIM domain or selector is not ASCII: {exc}") from exc
    return b"DKIM-Signature: " + value + message


_SIGNATURE = b"DKIM-Signature"
_NAMELEN = len(_SIGNATURE)
_WANTED = frozenset(h.lower().encode("ascii") for h in SIGNED_HEADERS)
_OVERSIGNED_BYTES = tuple(sorted(h.encode("ascii") for h in _OVERSIGNED))


def _a_label(domain: str) -> str:
    """The domain in ASCII (RFC 6376 §3.5: d= holds A-labels for internationalised names)."""
    if domain.isascii():
        return domain
    return idna.encode(domain, uts46=True).decode("ascii")


def generate_keypair(bits: int = 2048) -> tuple[bytes, str]:
    """A new RSA key: (private key PEM, the DNS TXT value "v=DKIM1; k=rsa; p=...").

    The TXT record lives at `<selector>._domainkey.<domain>` (RFC 6376 §3.6.2.1); split
    it with split_txt() for DNS servers that need 255-byte strings.
    """
    if bits < 1024:
        # RFC 8301 §3.2: signers MUST use at least 1024 bits (verifiers reject less).
        raise ValueError("DKIM RSA keys must be at least 1024 bits")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.TraditionalOpenSSL,
        encryption_algorithm=serialization.NoEncryption(),
    )
    # RFC 6376 §3.6.1: p= is the base64 of the DER SubjectPublicKeyInfo.
    public_der = key.public_key().public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    public_b64 = base64.b64encode(public_der).decode("ascii")
    return private_pem, f"v=DKIM1; k=rsa; p={public_b64}"


def split_txt(value: str, size: int = 255) -> list[str]:
    """A TXT value cut into character-strings of at most `size` bytes (RFC 1035 §3.3.14)."""
    raw = value.encode("ascii")
    return [raw[i : i + size].decode("ascii") for i in range(0, len(raw), size)] or [""]
