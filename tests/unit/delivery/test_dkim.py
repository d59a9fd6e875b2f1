"""Tests for DKIM signing: sign, then verify with dkimpy against the generated key."""

from __future__ import annotations

import functools
from collections.abc import Callable

import dkim as dkimpy
import pytest

from postbode.delivery.dkim import DkimError, generate_keypair, sign, split_txt

MESSAGE = (
    b"From: Shop <orders@shop.test>\r\n"
    b"To: Alice <alice@dest.test>\r\n"
    b"Subject: Your order 1234\r\n"
    b"Date: Tue, 01 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1234@shop.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"List-Unsubscribe: <https://shop.test/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: not signed\r\n"
    b"\r\n"
    b"Thank you for your order.\r\n"
)


@functools.cache
def _keypair() -> tuple[bytes, str]:
    # 1024 bits keeps the suite fast; the default (2048) is tested once below.
    return generate_keypair(1024)


def _dnsfunc(txt: str) -> Callable[..., bytes]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"s1._domainkey.shop.test."
        return txt.encode("ascii")

    return dnsfunc


def _signature_tags(signed: bytes) -> dict[str, str]:
    header, _, _ = signed.partition(b"\r\nFrom:")
    value = header.decode().split(":", 1)[1]
    tags = {}
    for part in "".join(value.split()).split(";"):
        if part:
            key, _, tag_value = part.partition("=")
            tags[key] = tag_value
    return tags


def test_sign_then_verify() -> None:
    private_pem, txt = _keypair()
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(MESSAGE)
    assert dkimpy.verify(signed, dnsfunc=_dnsfunc(txt))


def test_signature_parameters_and_oversigned_from() -> None:
    private_pem, _ = _keypair()
    tags = _signature_tags(sign(MESSAGE, "shop.test", "s1", private_pem))
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == "shop.test"
    assert tags["s"] == "s1"
    assert tags["h"].split(":") == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "from",
    ]


def test_tampered_body_fails() -> None:
    private_pem, txt = _keypair()
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    tampered = signed.replace(b"Thank you", b"Pay us")
    assert not dkimpy.verify(tampered, dnsfunc=_dnsfunc(txt))


def test_tampered_subject_fails() -> None:
    private_pem, txt = _keypair()
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    tampered = signed.replace(b"Your order 1234", b"Your order 9999")
    assert not dkimpy.verify(tampered, dnsfunc=_dnsfunc(txt))


def test_added_from_header_fails() -> None:
    private_pem, txt = _keypair()
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    header_end = signed.index(b"\r\n\r\n")
    tampered = signed[:header_end] + b"\r\nFrom: evil@attacker.test" + signed[header_end:]
    assert not dkimpy.verify(tampered, dnsfunc=_dnsfunc(txt))


def test_relaxed_canonicalization_survives_whitespace_changes() -> None:
    private_pem, txt = _keypair()
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    rewrapped = signed.replace(b"Subject: Your order", b"Subject:   Your   order")
    assert dkimpy.verify(rewrapped, dnsfunc=_dnsfunc(txt))


def test_wrong_key_fails() -> None:
    private_pem, _ = _keypair()
    _, other_txt = generate_keypair(1024)
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    assert not dkimpy.verify(signed, dnsfunc=_dnsfunc(other_txt))


def test_default_keypair_is_2048_bit_and_verifies() -> None:
    private_pem, txt = generate_keypair()
    assert private_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert txt.startswith("v=DKIM1; k=rsa; p=")
    assert len(txt) > 255  # a 2048-bit key needs splitting into DNS strings
    signed = sign(MESSAGE, "shop.test", "s1", private_pem)
    assert dkimpy.verify(signed, dnsfunc=_dnsfunc(txt))


def test_internationalised_signing_domain_is_a_label() -> None:
    private_pem, _ = _keypair()
    tags = _signature_tags(sign(MESSAGE, "shöp.test", "s1", private_pem))
    assert tags["d"] == "xn--shp-tna.test"


def test_split_txt() -> None:
    _, txt = generate_keypair()
    parts = split_txt(txt)
    assert "".join(parts) == txt
    assert all(len(p) <= 255 for p in parts)
    assert len(parts) == 2


def test_message_without_from_is_refused() -> None:
    private_pem, _ = _keypair()
    with pytest.raises(DkimError):
        sign(b"To: a@dest.test\r\nSubject: x\r\n\r\nbody\r\n", "shop.test", "s1", private_pem)


@pytest.mark.parametrize(
    "pem",
    [
        b"not a key",
        # the PEM frame is there, the base64 inside it is broken (binascii.Error)
        b"-----BEGIN RSA PRIVATE KEY-----\nMIIEow!\n-----END RSA PRIVATE KEY-----\n",
        b"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n",
    ],
)
def test_bad_key_is_refused(pem: bytes) -> None:
    # DkimError, which the worker turns into sending unsigned with a note; any other error
    # would park the whole connection's batch as a bug
    with pytest.raises(DkimError):
        sign(MESSAGE, "shop.test", "s1", pem)


def test_small_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        generate_keypair(512)


def _dkimpys_own_signature(message: bytes, domain: str, selector: str, pem: bytes) -> bytes:
    """The signature as dkimpy's DKIM.sign makes it, for the same choice of header fields."""
    import dkim as dkimpy

    from postbode.delivery import dkim as ours

    linesep = b"\r\n" if b"\r\n" in message else b"\n"
    signer = dkimpy.DKIM(message, linesep=linesep)
    include = [n.lower() for n, _ in signer.headers if n.lower() in ours._WANTED]
    include += [b"from"] if b"from" in include else []
    signature = signer.sign(
        selector.encode(),
        domain.encode(),
        pem,
        signature_algorithm=b"rsa-sha256",
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    assert isinstance(signature, bytes)
    return signature


def test_signatures_are_dkimpys_own_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signing without dkimpy's DKIM object gives, byte for byte, what dkimpy computes itself
    (with every shortcut undone: its own parser, canonicalization and pure-Python RSA), for
    well-formed mail and for random header fields and bodies (CRLF or LF, folded fields,
    repeated fields, runs of whitespace, trailing blank lines)."""
    import random
    import time

    import dkim as dkimpy
    import dkim.canonicalization

    from postbode.delivery import dkim as ours

    private, _ = ours.generate_keypair(1024)
    rng = random.Random(6376)
    names = [b"From", b"from", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"X-Other"]
    names += [b"MIME-Version", b"Content-Type", b"List-Unsubscribe", b"Received"]
    words = [b"a", b"shop", b"<x@shop.test>", b" ", b"  ", b"\t", b";", b"=", b"0" * 90]
    messages = [MESSAGE, MESSAGE.replace(b"\r\n", b"\n"), b"From: a@shop.test\r\n\r\n"]
    for _ in range(60):
        lines = []
        for _ in range(rng.randint(1, 8)):
            value = b"".join(rng.choices(words, k=rng.randint(0, 12)))
            if rng.random() < 0.2:
                value += b"\r\n\t" + b"".join(rng.choices(words, k=rng.randint(1, 5)))
            lines.append(rng.choice(names) + b":" + rng.choice([b" ", b"", b"\t"]) + value)
        lines.insert(rng.randint(0, len(lines)), b"From: Shop <orders@shop.test>")
        body_lines = [b"".join(rng.choices(words, k=rng.randint(0, 8))) for _ in range(5)]
        body_lines += [b""] * rng.randint(0, 3)
        message = b"\r\n".join(lines) + b"\r\n\r\n" + b"\r\n".join(body_lines)
        messages.append(message if rng.random() < 0.8 else message.replace(b"\r\n", b"\n"))

    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.5)
    fast = [ours.sign(m, "shop.test", "sel", private) for m in messages]
    # dkimpy as it comes: none of the shortcuts postbode.delivery.dkim installs
    monkeypatch.setattr(dkimpy, "RSASSA_PKCS1_v1_5_sign", ours._pure_python_sign)
    monkeypatch.setattr(dkimpy, "parse_pem_private_key", ours._parse_pem_private_key)
    monkeypatch.setattr(dkimpy, "rfc822_parse", ours._rfc822_parse)
    canonicalization = dkim.canonicalization
    monkeypatch.setattr(canonicalization, "compress_whitespace", ours._compress_whitespace)
    monkeypatch.setattr(canonicalization, "unfold_header_value", ours._unfold_header_value)
    monkeypatch.setattr(
        canonicalization, "strip_trailing_whitespace", ours._strip_trailing_whitespace
    )
    for message, signed in zip(messages, fast, strict=True):
        assert signed == _dkimpys_own_signature(message, "shop.test", "sel", private) + message


def test_a_key_is_parsed_once_for_many_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """dkimpy would parse the PEM (in pure Python) for every message; the key is cached."""
    from postbode.delivery import dkim as ours

    parsed: list[bytes] = []
    parse = ours._parse_pem_private_key

    def counting(pem: bytes) -> dict[str, int]:
        parsed.append(pem)
        return parse(pem)  # type: ignore[no-any-return]

    private_pem, txt = generate_keypair(1024)
    monkeypatch.setattr(ours, "_parse_pem_private_key", counting)
    signed = [sign(MESSAGE, "shop.test", "s1", private_pem) for _ in range(3)]
    assert parsed == [private_pem]
    assert all(dkimpy.verify(s, dnsfunc=_dnsfunc(txt)) for s in signed)
    other_pem, other_txt = generate_keypair(1024)  # other key material: parsed on its own
    assert dkimpy.verify(sign(MESSAGE, "shop.test", "s1", other_pem), dnsfunc=_dnsfunc(other_txt))
    assert parsed == [private_pem, other_pem]
    with pytest.raises(DkimError):  # an unreadable key is refused every time, never cached
        sign(MESSAGE, "shop.test", "s1", b"not a key")
    with pytest.raises(DkimError):
        sign(MESSAGE, "shop.test", "s1", b"not a key")


def _outcome(function: Callable[[bytes], object], data: bytes) -> object:
    try:
        return function(data)
    except Exception as exc:  # dkimpy raises on malformed headers: the same error is expected
        return type(exc)


def test_the_faster_text_passes_give_dkimpys_bytes() -> None:
    """The canonicalization and parsing shortcuts return exactly what dkimpy's own functions
    do, for well-formed mail and for random bytes made of what those functions look at."""
    import random

    from postbode.delivery import dkim as ours

    pairs = [
        (ours._fast_rfc822_parse, ours._rfc822_parse),
        (ours._fast_strip_trailing_whitespace, ours._strip_trailing_whitespace),
        (ours._fast_compress_whitespace, ours._compress_whitespace),
        (ours._fast_unfold_header_value, ours._unfold_header_value),
    ]
    pieces = [b"a", b"b", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\n\n"]
    pieces += [b"From: x@shop.test", b"Subject: hi", b"From x", b":", b".", b"\r\n "]
    rng = random.Random(6376)
    samples = [
        MESSAGE,
        MESSAGE.replace(b"\r\n", b"\n"),
        MESSAGE + b"  trailing  \t \r\n\r\n\r\n",
        b"Subject: folded\r\n\tvalue\r\n\r\nbody",
        b"\r\nbody only",
        b"\nbody only",
        b"Subject: no body\r\n",
        b"Subject: no body",
        b"Subject: bare LF\n\r\nmixed\nbody\r\n",
        b"Subject: x\r\n\r\n",
        b"",
    ]
    samples += [b"".join(rng.choices(pieces, k=rng.randint(0, 30))) for _ in range(4000)]
    samples += [b"Subject: x\r\n" + s for s in samples[-2000:]]
    for fast, original in pairs:
        for sample in samples:
            assert _outcome(fast, sample) == _outcome(original, sample), (fast, sample)
