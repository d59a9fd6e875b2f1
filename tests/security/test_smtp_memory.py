"""Strangers on port 25 cost bounded memory: ten connections without AUTH, each pushing 50 MB
of DATA at the return path (in lines of every shape), leave the memory of every Postbode
process as it was, and each hears 552 (500 for the endless line) when it passes the limit,
not after sending the rest."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postbode.testing.process import PostbodeProcess

PUSH_BYTES = 50 * 1024 * 1024
LIMIT = 10 * 1024 * 1024  # smtp_max_unauthenticated_message_size's default
# The reply may wait behind what the kernel buffers on both sides of a loopback connection
# (a few MB each way) and what was in flight: well short of the 40 MB still to come.
REPLY_SLACK = 20 * 1024 * 1024
MAX_GROWTH = 100 * 1024 * 1024
RETURN = "return.postbode.localhost"

SHAPES = {
    "lines": (b"y" * 996 + b"\r\n") * 256,  # the longest lines RFC 5321 allows
    "short": b"x\r\n" * 87_381,  # one object a line, were every line kept apart
    "dots": b"..\r\n" * 65_536,  # dot-stuffing on every line
    "endless": b"z" * 262_144,  # one line that never ends
}
ORDER = ["lines", "lines", "short", "short", "dots", "endless", "lines", "short", "lines", "dots"]


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def postbode_pids(server: PostbodeProcess) -> list[int]:
    assert server.proc is not None
    return [server.proc.pid, *server.children("worker"), *server.children("listen")]


@dataclass
class Push:
    shape: str
    sent: int = 0
    reply: bytes = b""
    sent_at_reply: int | None = None


class Replies:
    """Reply lines from the server, however the kernel cuts them up."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.buffer = b""

    def expect(self, code: bytes) -> bytes:
        """The next (multi-line) reply, which must carry `code`."""
        while True:
            lines = self.buffer.split(b"\r\n")
            ends = [i for i, line in enumerate(lines[:-1]) if line[3:4] != b"-"]
            if ends:
                reply = b"\r\n".join(lines[: ends[0] + 1])
                self.buffer = b"\r\n".join(lines[ends[0] + 1 :])
                assert reply.startswith(code), reply
                return reply
            chunk = self.s.recv(4096)
            assert chunk, f"connection closed waiting for {code!r} after {self.buffer!r}"
            self.buffer += chunk


def push(port: int, job: Push, give_up: threading.Event) -> None:
    """An SMTP client without AUTH that sends PUSH_BYTES of DATA whatever it hears meanwhile
    (as a hostile one does), noting when the reply came; then ends the data and QUITs."""
    frame = SHAPES[job.shape]
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        replies = Replies(s)
        replies.expect(b"220")
        s.sendall(b"EHLO mx.stranger.test\r\n")
        replies.expect(b"250")
        s.sendall(f"MAIL FROM:<>\r\nRCPT TO:<postmaster@{RETURN}>\r\nDATA\r\n".encode())
        for code in (b"250", b"250", b"354"):
            replies.expect(code)
        while job.sent < PUSH_BYTES and not give_up.is_set():
            s.sendall(frame)
            job.sent += len(frame)
            if job.sent_at_reply is None and select.select([s], [], [], 0)[0]:
                job.sent_at_reply = job.sent
                job.reply = replies.expect(b"")
        s.sendall(b"\r\n.\r\n")
        if job.sent_at_reply is None:
            job.reply = replies.expect(b"")
        # The session goes on after the refused message: the server read up to the end.
        s.sendall(b"NOOP\r\nQUIT\r\n")
        replies.expect(b"250")
        replies.expect(b"221")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostbodeProcess]:
    """`postbode serve` on free ports with one worker process, from start to stop."""
    running = PostbodeProcess(
        tmp_path, {"POSTBODE_WORKERS": "1", "POSTBODE_WORKER_IDLE_SECONDS": "0"}
    ).start(timeout=180)
    try:
        yield running
    finally:
        running.stop()


def test_ten_strangers_pushing_50_mb_each_cost_no_memory(server: PostbodeProcess) -> None:
    pids = postbode_pids(server)
    assert len(pids) == 2
    # One small bounce first (imports, caches), then the baseline.
    with socket.create_connection(("127.0.0.1", server.smtp_port), timeout=60) as s:
        replies = Replies(s)
        replies.expect(b"220")
        s.sendall(f"EHLO mx.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster@{RETURN}>\r\n".encode())
        for code in (b"250", b"250", b"250"):
            replies.expect(code)
        s.sendall(b"DATA\r\n")
        replies.expect(b"354")
        s.sendall(b"Subject: hello\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        replies.expect(b"250")
    baseline = sum(rss(p) for p in pids)
    peak = baseline
    done = threading.Event()
    give_up = threading.Event()  # past the budget: stop pushing, the test has failed

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(rss(p) for p in pids))
            if peak - baseline > MAX_GROWTH:
                give_up.set()
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    jobs = [Push(shape) for shape in ORDER]
    pushers = [threading.Thread(target=push, args=(server.smtp_port, j, give_up)) for j in jobs]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join(300)
    done.set()
    sampler.join()
    assert not any(t.is_alive() for t in pushers)
    grew = peak - baseline
    assert grew < MAX_GROWTH, f"Postbode grew by {grew / 2**20:.0f} MB"
    for job in jobs:
        assert job.sent >= PUSH_BYTES, job
        if job.shape == "endless":
            assert job.reply.startswith(b"500 5.5.2 Line too long"), job.reply
        else:
            assert job.reply.startswith(b"552 5.3.4 Message too big"), job.reply
        # Heard at the limit, not at the end.
        assert job.sent_at_reply is not None and job.sent_at_reply < LIMIT + REPLY_SLACK, job
