"""Request bodies cost a stranger's nothing: `postbode serve` authenticates before it reads a
body and caps every body as it streams in, so ten connections pushing 200 MB each without a
key (or past the cap with one) leave the memory of every Postbode process as it was."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.testing.process import PostbodeProcess

PUSH_BYTES = 200 * 1024 * 1024
CHUNK = b"x" * (256 * 1024)
MAX_GROWTH = 100 * 1024 * 1024


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


def push(port: int, path: str, chunked: bool, key: str | None, statuses: list[int]) -> None:
    """POST PUSH_BYTES to `path` without waiting for the answer (as a hostile client does);
    stops when the server closes the connection; notes the status if one can be read."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {PUSH_BYTES}")
    if key:
        head.append(f"Authorization: Bearer {key}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            sent = 0
            frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
            while sent < PUSH_BYTES:
                s.sendall(frame)
                sent += len(CHUNK)
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:  # the server hung up: it will not read the rest
            pass
        try:
            answer = s.recv(4096)
        except OSError:
            return
        if answer.startswith(b"HTTP/1.1 "):
            statuses.append(int(answer[9:12]))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[PostbodeProcess, str]]:
    """`postbode serve` on free ports with one worker process; an app's API key."""
    store = create_store(Settings(data_dir=tmp_path))
    key = tenancy.create_app(store, "shop").api_key
    store.dispose()
    # A generous wait for start-up: a loaded machine takes long to start three processes.
    running = PostbodeProcess(
        tmp_path, {"POSTBODE_WORKERS": "1", "POSTBODE_WORKER_IDLE_SECONDS": "0"}
    ).start(timeout=180)
    try:
        yield running, key
    finally:
        running.stop()


def test_ten_strangers_pushing_200_mb_each_cost_no_memory(
    server: tuple[PostbodeProcess, str],
) -> None:
    running, key = server
    pids = postbode_pids(running)
    assert len(pids) == 2
    # Warm every route once (imports, caches), then take the baseline.
    for path in ("/api/v1/suppressions", "/api/v1/messages", "/login"):
        httpx.post(f"{running.http_url}{path}", json={})
    baseline = sum(rss(p) for p in pids)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(rss(p) for p in pids))
            time.sleep(0.02)

    routes = [
        # (path, chunked, key): no key, or a key and a body past the cap
        ("/api/v1/messages", False, None),
        ("/api/v1/messages", True, None),
        ("/api/v1/suppressions", False, None),
        ("/api/v1/suppressions", True, None),
        ("/api/v1/webhooks", True, None),
        ("/api/v1/deliveries/cancel", False, None),
        ("/api/v1/suppressions/import", True, None),
        ("/login", True, None),
        ("/api/v1/suppressions", True, key),
        ("/api/v1/messages", True, key),
    ]
    statuses: list[int] = []
    sampler = threading.Thread(target=sample)
    sampler.start()
    pushers = [
        threading.Thread(target=push, args=(running.http_port, path, chunked, k, statuses))
        for path, chunked, k in routes
    ]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join(120)
    done.set()
    sampler.join()
    assert not any(t.is_alive() for t in pushers)
    grew = peak - baseline
    assert grew < MAX_GROWTH, f"Postbode grew by {grew / 2**20:.0f} MB"
    assert statuses and all(s in (401, 403, 413) for s in statuses), statuses
    # And it still serves.
    assert httpx.get(f"{running.http_url}/healthz").status_code == 200


def test_a_body_past_the_cap_is_refused_with_a_key_too(server: tuple[PostbodeProcess, str]) -> None:
    running, key = server
    auth = {"Authorization": f"Bearer {key}"}
    big = b'{"suppressions": [' + b'{"email": "a@b.test"},' * 60_000 + b"]}"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    for body in (big, chunks()):
        answer = httpx.post(
            f"{running.http_url}/api/v1/suppressions",
            content=body,
            headers={**auth, "Content-Type": "application/json"},
        )
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "too_large"
