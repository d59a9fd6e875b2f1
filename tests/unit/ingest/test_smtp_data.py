"""DATA as it streams in: the message comes back as sent whatever the pieces it arrives in, the
reader never reads past the end-of-data line, and the limits hold before anything is kept."""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from postbode.ingest.smtp_data import (
    LINE_TOO_LONG,
    MAX_LINE,
    SPOOL_IN_MEMORY,
    TOO_BIG,
    DataReader,
    DataScanner,
)

PIPELINED = b"MAIL FROM:<>\r\nQUIT\r\n"


def stuffed(message: bytes) -> bytes:
    """What a client sends for `message` (which ends with CRLF): RFC 5321 §4.5.2."""
    head = b"." if message.startswith(b".") else b""
    return head + message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass
class Read:
    message: bytes | None  # None: refused
    rest: bytes  # left in the stream after the end of data
    refusals: list[str]  # as announced
    kept: int  # bytes in the spool at the end
    on_disk: bool


def read(wire: bytes, cuts: list[int], limit: int = 10**6) -> Read:
    """Runs a DataReader over `wire` arriving in pieces cut at `cuts`."""

    async def go() -> Read:
        stream = asyncio.StreamReader(limit=1001)  # as aiosmtpd makes its reader
        refusals: list[str] = []

        async def refuse(why: str) -> None:
            refusals.append(why)

        async def arrive() -> None:
            start = 0
            for cut in [*sorted(cuts), len(wire)]:
                stream.feed_data(wire[start:cut])
                start = cut
                await asyncio.sleep(0)
            stream.feed_eof()

        with contextlib.closing(DataReader(limit)) as data:
            feeding = asyncio.ensure_future(arrive())
            await data.read(stream, refuse)
            await feeding
            assert (data.scanner.refusal is None) == (not refusals)
            kept, on_disk = data.spool.seek(0, io.SEEK_END), data.spool._rolled  # type: ignore[attr-defined]
            message = None if refusals else data.message()
        return Read(message, await stream.read(), refusals, kept, on_disk)

    return asyncio.run(go())


line = st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")) | st.sampled_from(
    [b"", b".", b"..", b".\r", b"\r", b"\n.", b"x\r", b". ", b"\n"]
)
messages = st.lists(line, max_size=30).map(lambda lines: b"".join(x + b"\r\n" for x in lines))


@hypothesis_settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_the_message_comes_back_as_sent_and_the_stream_is_read_to_its_end_only(
    message: bytes, cuts: list[int]
) -> None:
    wire = stuffed(message) + PIPELINED
    got = read(wire, [c for c in cuts if c < len(wire)])
    assert got.message == message
    assert got.rest == PIPELINED


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=0, max_value=3 * MAX_LINE),
    st.integers(min_value=1, max_value=6000),
    st.lists(st.integers(min_value=0, max_value=8000), max_size=8),
)
def test_limits_refuse_once_and_the_end_is_still_found(
    longest: int, limit: int, cuts: list[int]
) -> None:
    message = b"Subject: x\r\n\r\n" + b"a" * longest + b"\r\n" + b"b" * 70 + b"\r\n"
    wire = stuffed(message) + PIPELINED
    got = read(wire, [c for c in cuts if c < len(wire)], limit)
    expected = set()
    if longest > MAX_LINE:
        expected.add(LINE_TOO_LONG)
    if len(message) > limit:
        expected.add(TOO_BIG)
    assert len(got.refusals) == (1 if expected else 0)
    assert set(got.refusals) <= expected
    assert got.rest == PIPELINED
    assert got.message == (None if expected else message)


def test_an_endless_line_and_a_flood_of_short_lines_keep_nothing() -> None:
    for body in (b"z" * (4 << 20), b"x\r\n" * (1 << 20)):
        got = read(stuffed(body + b"\r\n"), [], limit=1 << 20)
        assert got.refusals and got.rest == b""
        assert got.kept == 0  # nothing kept past the refusal


def test_a_large_message_goes_to_a_file_not_to_memory() -> None:
    message = (b"c" * 998 + b"\r\n") * (2 * SPOOL_IN_MEMORY // 1000)
    got = read(stuffed(message), [])
    assert got.on_disk and got.message == message


def test_feeding_past_the_end_is_an_error() -> None:
    scanner = DataScanner(100, io.BytesIO())
    try:
        scanner.feed(b"hi\r\n.\r\nQUIT\r\n")
    except ValueError:
        pass
    else:
        raise AssertionError("read past the end of data unnoticed")
