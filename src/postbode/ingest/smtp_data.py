"""The DATA of an SMTP transaction as it streams in: where it ends, dot-stuffing, and its size
and line limits, checked before anything is kept (RFC 5321 §4.5.2, §4.5.3.1)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

# RFC 5321 §4.1.1.4: the mail data ends with a line holding a single ".".
END_OF_DATA = b"\r\n.\r\n"
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF; a little slack for
# sloppy clients, as before.
MAX_LINE = 1000
# A message is kept in memory up to this size, then in an unlinked file beside the store: the
# memory a session costs does not grow with what the client sends.
SPOOL_IN_MEMORY = 256 * 1024

TOO_BIG = "too_big"
LINE_TOO_LONG = "line_too_long"

# Awaited with TOO_BIG or LINE_TOO_LONG when a limit is passed.
OnRefusal = Callable[[str], Awaitable[None]]


def _partial_end(window: bytes) -> int:
    """The length of the longest proper prefix of END_OF_DATA that `window` ends with."""
    for size in range(len(END_OF_DATA) - 1, 0, -1):
        if window.endswith(END_OF_DATA[:size]):
            return size
    return 0


class DataScanner:
    """Takes the bytes that follow the 354 reply, in pieces of any size; knows when the
    end-of-data line has come, removes dot-stuffing, and writes the message to `sink` while
    it is within `limit` bytes and MAX_LINE per line. Past a limit it keeps nothing more and
    `refusal` says why; it still watches for the end of data, so the session can go on."""

    def __init__(self, limit: int, sink: IO[bytes]) -> None:
        self.limit = limit
        self.sink = sink
        self.size = 0
        self.done = False
        self.refusal: str | None = None
        # The stream so far ends with this prefix of END_OF_DATA, not yet written: the CRLF
        # before the first line is implied (an empty message is just ".\r\n").
        self._held = b"\r\n"
        self._implied = 2  # bytes of the output that are that implied CRLF
        self._line = 0  # length of the current, unfinished line

    @property
    def pending(self) -> int:
        """How many bytes at the end of what was fed may begin the end-of-data line. While
        not zero, the caller reads one byte at a time, so as never to read past the end of
        data into the commands a pipelining client sent after it (RFC 2920)."""
        return len(self._held)

    def feed(self, piece: bytes) -> None:
        if self.done:
            raise ValueError("fed past the end of data")
        window = self._held + piece
        end = window.find(END_OF_DATA)
        if end >= 0:
            if end + len(END_OF_DATA) != len(window):
                raise ValueError("fed past the end of data")
            body, self._held, self.done = window[: end + 2], b"", True
        else:
            keep = _partial_end(window)
            body, self._held = window[: len(window) - keep], window[len(window) - keep :]
        if self.refusal is not None or not body:
            return
        # RFC 5321 §4.5.2: a line that begins with "." had one more "." put in front. The
        # body never ends inside a "\r\n." (that is a prefix of END_OF_DATA: held back).
        body = body.replace(b"\r\n.", b"\r\n")
        if self._implied:
            cut = min(self._implied, len(body))
            body, self._implied = body[cut:], self._implied - cut
        self.size += len(body)
        if self.size > self.limit:
            self.refusal = TOO_BIG
        elif not self._lines_fit(body):
            self.refusal = LINE_TOO_LONG
        else:
            self.sink.write(body)

    def _lines_fit(self, body: bytes) -> bool:
        # The body never ends with the CR of a CRLF (also a prefix of END_OF_DATA).
        if self._line + len(body) <= MAX_LINE:
            last = body.rfind(b"\r\n")
            self._line = self._line + len(body) if last < 0 else len(body) - last - 2
            return True
        lines = body.split(b"\r\n")
        if len(lines) == 1:
            self._line += len(body)
            return self._line <= MAX_LINE
        first = self._line + len(lines[0])
        self._line = len(lines[-1])
        inner = max(map(len, lines[1:-1]), default=0)
        return max(first, inner, self._line) <= MAX_LINE


class DataReader:
    """Reads DATA from an asyncio StreamReader with a DataScanner, without ever holding more
    than the reader's own bounded buffer plus SPOOL_IN_MEMORY, whatever the shape of the input
    (many short lines, one endless line). `on_refusal` is awaited the moment a limit is
    passed, so the client hears it then, not after sending the rest."""

    def __init__(self, limit: int, spool_dir: Path | None = None) -> None:
        # Closed by close(): the reader outlives the statement that makes it.
        self.spool: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_IN_MEMORY, dir=None if spool_dir is None else str(spool_dir)
        )
        self.scanner = DataScanner(limit, self.spool)

    async def read(self, reader: asyncio.StreamReader, on_refusal: OnRefusal) -> None:
        """Until the end-of-data line (raises IncompleteReadError if the client goes)."""
        scanner = self.scanner
        while not scanner.done:
            if scanner.pending:
                piece = await reader.readexactly(1)
            else:
                # No end of data can straddle what was read and what is to come: the first
                # END_OF_DATA in the stream is the end. The reader's limit bounds each piece.
                try:
                    piece = await reader.readuntil(END_OF_DATA)
                except asyncio.LimitOverrunError as exc:
                    piece = await reader.read(exc.consumed)
            refused = scanner.refusal
            scanner.feed(piece)
            if refused is None and scanner.refusal is not None:
                self.spool.seek(0)
                self.spool.truncate()
                await on_refusal(scanner.refusal)

    def message(self) -> bytes:
        """What was read (call once, after read() and when no limit was passed)."""
        self.spool.seek(0)
        return self.spool.read()

    def close(self) -> None:
        self.spool.close()
