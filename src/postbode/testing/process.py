"""A real `postbode` process for tests: started with its own environment, awaited until healthy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

# How long a test waits for a started `postbode` to answer: a second or two on a quiet machine;
# a loaded CI machine (other suites on the same cores) has been seen to take half a minute.
START_TIMEOUT = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for child processes that cannot report theirs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening_sockets(port: int) -> int:
    """How many sockets listen on TCP `port` on this machine (several listener processes of
    one `postbode serve` each have one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                count += state == "0A" and int(local.rpartition(":")[2], 16) == port
    return count


_migrated: set[str] = set()  # PostgreSQL databases this process saw `postbode migrate` run on


def migrate(env: Mapping[str, str]) -> None:
    """`postbode migrate` with `env`, as an operator runs it before starting the processes of
    a release on PostgreSQL (which do not migrate by themselves)."""
    subprocess.run(
        [sys.executable, "-m", "postbode", "migrate"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=START_TIMEOUT,
    )


class PostbodeProcess:
    """`postbode <command>` as a child process; `http_url` once it answers /healthz."""

    def __init__(
        self,
        data_dir: Path,
        env: Mapping[str, str] | None = None,
        command: str = "serve",
        *,
        new_session: bool = False,
    ) -> None:
        """`new_session`: in a process group of its own (so it and its children can be
        signalled together)."""
        self.data_dir = data_dir
        self.new_session = new_session
        self.http_port = free_port()
        self.smtp_port = free_port()
        self.command = command
        self.env = {
            # Tests and benchmarks send from domains whose records are never published.
            "POSTBODE_ALLOW_UNVERIFIED_DOMAINS": "true",
            **os.environ,
            "POSTBODE_DATA_DIR": str(data_dir),
            "POSTBODE_HTTP_PORT": str(self.http_port),
            "POSTBODE_SMTP_PORT": str(self.smtp_port),
            "POSTBODE_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"postbode-{command}.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = START_TIMEOUT) -> PostbodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = self.env.get("POSTBODE_DATABASE_URL", "")
        if url.startswith("postgres") and url not in _migrated:
            migrate(self.env)  # once per database: later starts find it at the right revision
            _migrated.add(url)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postbode", self.command],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )
        log.close()
        if self.command in ("serve", "web"):
            try:
                self.wait_healthy(timeout)
                self.wait_listeners(timeout)
            except BaseException:
                self.kill()  # a failed start must not leave a server running
                raise
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> float:
        """Seconds until /healthz answered 200; raises with the process's log if it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postbode exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.http_url}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"postbode not healthy after {timeout}s:\n{self.log()}")

    def wait_listeners(self, timeout: float = START_TIMEOUT) -> None:
        """Until every listener process (POSTBODE_LISTENERS) listens on both ports."""
        if self.command != "serve":
            return
        wanted = int(self.env.get("POSTBODE_LISTENERS", "1"))
        deadline = time.monotonic() + timeout
        while min(listening_sockets(self.http_port), listening_sockets(self.smtp_port)) < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {wanted} listeners after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def children(self, command: str) -> list[int]:
        """Pids of this process's `postbode <command>` children (worker, listen)."""
        assert self.proc is not None
        found = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                pids = (task / "children").read_text().split()
            except OSError:  # a thread that ended meanwhile
                continue
            for pid in pids:
                with contextlib.suppress(OSError):  # gone meanwhile
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if argv[-2:] == [command.encode(), b""]:
                        found.append(int(pid))
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """The log once it holds `text` (or as it is when `timeout` runs out)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return log

    def kill(self) -> None:
        """SIGKILL: the crash tests' way to stop it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> PostbodeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
