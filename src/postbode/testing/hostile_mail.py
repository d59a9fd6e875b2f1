"""A corpus of malformed and hostile inbound messages, made on the spot: what a receiving MX
meets (deep MIME nesting, broken encodings, huge headers, NUL bytes, 8-bit headers,
zip-bomb-like attachments …). Each must end stored and handed off, or refused with a reason."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

HEAD = (
    b"From: Mallory <mallory@sender.test>\r\n"
    b"To: support@in.shop.test\r\n"
    b"Message-ID: <hostile@sender.test>\r\n"
)


def _nested(depth: int) -> bytes:
    """`depth` multipart/mixed parts, each inside the last, a text part at the bottom."""
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return HEAD + b"Subject: deep\r\nMIME-Version: 1.0\r\n" + opening + b"\r\ndeep down" + closing


def _zip_bomb(expanded: int) -> bytes:
    """A small zip that would expand to `expanded` bytes of zeros (it is never expanded)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("zeros.bin", bytes(expanded))
    return buffer.getvalue()


def _attached(content: bytes, ctype: bytes, name: bytes, encoding: bytes = b"base64") -> bytes:
    import base64

    body = base64.encodebytes(content) if encoding == b"base64" else content
    return (
        HEAD + b"Subject: attached\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n'
        b"--x\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--x\r\nContent-Type: "
        + ctype
        + b'\r\nContent-Disposition: attachment; filename="'
        + name
        + b'"\r\nContent-Transfer-Encoding: '
        + encoding
        + b"\r\n\r\n"
        + body.replace(b"\n", b"\r\n")
        + b"\r\n--x--\r\n"
    )


def corpus() -> Iterator[tuple[str, bytes]]:
    """(name, message) pairs; every message is under 12 MB and has lines under 1000 octets
    unless its name says otherwise."""
    yield "deep nesting (40 levels)", _nested(40)
    yield "very deep nesting (3000 levels)", _nested(3000)
    yield (
        "thousands of parts",
        (
            HEAD
            + b'Subject: parts\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n'
            + b"".join(
                b"--p\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(5000)
            )
            + b"--p--\r\n"
        ),
    )
    yield (
        "multipart without a boundary",
        (HEAD + b"Subject: nb\r\nContent-Type: multipart/mixed\r\n\r\n--x\r\nhello\r\n--x--\r\n"),
    )
    yield (
        "unterminated multipart",
        (
            HEAD + b'Subject: open\r\nContent-Type: multipart/alternative; boundary="z"\r\n\r\n'
            b"--z\r\nContent-Type: text/plain\r\n\r\nno end in sight\r\n"
        ),
    )
    yield (
        "broken base64",
        _attached(b"", b"application/pdf", b"x.pdf", b"base64")
        .replace(b"see attached", b"see attached")
        .replace(b"--x--", b"@@@@ this is !!! not base64 ====\r\n--x--"),
    )
    yield (
        "broken quoted-printable",
        (
            HEAD + b"Subject: qp\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=E2=82 =\r\n=C3=\r\n"
        ),
    )
    yield (
        "unknown charset",
        (
            HEAD + b"Subject: =?x-klingon?q?Qapla=27?=\r\n"
            b"Content-Type: text/plain; charset=x-klingon\r\n\r\n\xff\xfe tlhIngan Hol\r\n"
        ),
    )
    yield (
        "latin-1 declared as utf-8",
        (HEAD + b"Subject: caf\xe9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xe9\r\n"),
    )
    yield (
        "garbage encoded words",
        (HEAD + b"Subject: =?utf-8?b?####?= =?unknown?q?x?= =?utf-8?q?=FF=FE?=\r\n\r\nbody\r\n"),
    )
    yield (
        "8-bit headers",
        (
            b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@sender.test>\r\n"
            b"To: support@in.shop.test\r\n"
            b"Subject: Gr\xc3\xbc\xc3\x9fe \xe2\x80\x94 \xf0\x9f\x93\xa6\r\n"
            b"X-Latin1: \xe9t\xe9\r\n\r\nHallo\r\n"
        ),
    )
    yield (
        "NUL bytes",
        (HEAD + b"Subject: nul\x00here\r\nX-Nul: a\x00b\r\n\r\nbody\x00with\x00nuls\r\n"),
    )
    yield (
        "broken RFC 2231 file name",
        _attached(b"data", b"text/csv", b"x").replace(
            b'filename="x"', b"filename*=utf-8''%ZZ%%bad; filename*0*=x"
        ),
    )
    yield (
        "broken attached message",
        _attached(b"not a message at all\r\n\x00\x01", b"message/rfc822", b"fwd.eml", b"7bit"),
    )
    yield (
        "zip bomb (10 MB of zeros in a few KB)",
        _attached(_zip_bomb(10 * 1024 * 1024), b"application/zip", b"invoice.zip"),
    )
    yield (
        "compressible megabytes",
        (HEAD + b"Subject: aaaa\r\n\r\n" + (b"A" * 998 + b"\r\n") * 5000),
    )
    yield "no body", HEAD + b"Subject: only headers\r\n"
    yield "no header/body separator", b"just some text without any header\r\nand more\r\n"
    yield "header with no colon", HEAD + b"this is not a header\r\nSubject: x\r\n\r\nbody\r\n"
    yield (
        "huge header section (300 KB)",
        (
            HEAD
            + b"Subject: big\r\nX-Big: "
            + b"\r\n ".join([b"y" * 900] * 340)
            + b"\r\n\r\nbody\r\n"
        ),
    )
    yield (
        "too many header fields (1500)",
        (HEAD + b"".join(b"X-Many-%d: v\r\n" % i for i in range(1500)) + b"\r\nbody\r\n"),
    )
