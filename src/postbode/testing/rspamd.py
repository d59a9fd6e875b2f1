"""A private rspamd for tests: its own scratch configuration directory, database and loopback
ports, and a loopback DNS server as its only resolver (so it reaches nothing off the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from postbode.testing.dns import LoopbackDNS
from postbode.testing.process import free_port

__all__ = [
    "CONTENT_RULE",
    "GTUBE",
    "MIDDLE_MARKER",
    "MIDDLE_SCORE",
    "Rspamd",
    "RspamdError",
    "rspamd_binary",
    "rspamd_session",
]

RSPAMD = "/usr/bin/rspamd"
USER = "_rspamd"
# rspamd compiles its URL suffix list and rules into Hyperscan databases at start: ~6 s on a
# quiet machine, 30-50 s on a busy one. They are cached here, shared by every test session
# (named by a hash of what they compile, written atomically), so later starts take ~1 s.
HS_CACHE = Path(tempfile.gettempdir()) / "postbode-test-rspamd-hs-cache"
START_TIMEOUT = 180.0

# The GTUBE test string: rspamd's GTUBE rule makes any message carrying it a `reject`.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# A rule of the tests' own (a multimap on the Subject): a message whose subject holds the
# marker scores a fixed 8.5, between Postbode's default hold (6) and reject (15) scores.
CONTENT_RULE = "POSTBODE_TEST_MIDDLE"
MIDDLE_MARKER = "middle-score-marker"
MIDDLE_SCORE = 8.5
_MULTIMAP = f"""\
{CONTENT_RULE} {{
  type = "header";
  header = "Subject";
  regexp = true;
  map = "${{LOCAL_CONFDIR}}/middle_subjects.map";
  score = {MIDDLE_SCORE};
  description = "Postbode test rule: a subject naming the middle-score marker";
}}
"""


class RspamdError(RuntimeError):
    """rspamd is missing, refused its configuration or did not start."""


def rspamd_binary() -> str | None:
    """The rspamd binary, or None when it is not installed."""
    return RSPAMD if os.access(RSPAMD, os.X_OK) else shutil.which("rspamd")


class Rspamd:
    """`rspamd -f` from a scratch directory; `url` (its normal worker, where /checkv2 is) once
    /ping answers pong. `local_d` adds files to its local.d (name -> content)."""

    def __init__(self, local_d: Mapping[str, str] | None = None) -> None:
        binary = rspamd_binary()
        if binary is None:
            raise RspamdError("the rspamd binary is not installed (apt-get install rspamd)")
        self.binary = binary
        self.local_d = dict(local_d or {})
        self.dir = Path(tempfile.mkdtemp(prefix="postbode-rspamd-"))
        self.port = 0
        self.dns = LoopbackDNS()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "rspamd.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _configure(self) -> None:
        d = self.dir
        d.chmod(0o755)
        for sub in ("local.d", "override.d", "run", "db", "log"):
            (d / sub).mkdir()
        self.port = free_port()
        override = {
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n',
            "worker-controller.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "worker-proxy.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "worker-fuzzy.inc": "count = -1;\n",
            "logging.inc": 'type = "console";\nlevel = "warning";\n',
        }
        local = {
            # Its only resolver is loopback: lists, maps and fuzzy servers named by outside
            # hosts are refused at once instead of reached.
            "options.inc": f'dns {{ nameserver = ["{self.dns.nameserver}"]; }}\n'
            f'hs_cache_dir = "{HS_CACHE}";\n',
            "multimap.conf": _MULTIMAP,
            **self.local_d,
        }
        for name, text in override.items():
            (d / "override.d" / name).write_text(text)
        for name, text in local.items():
            (d / "local.d" / name).write_text(text)
        (d / "middle_subjects.map").write_text(f"/{MIDDLE_MARKER}/i\n")
        HS_CACHE.mkdir(mode=0o755, exist_ok=True)
        for path in (d / "run", d / "db", d / "log", HS_CACHE):
            shutil.chown(path, USER, USER)

    def start(self) -> Self:
        self.dns.start()
        try:
            self._configure()
            with self._log.open("wb") as out:
                self._process = subprocess.Popen(
                    [
                        self.binary,
                        "-f",
                        "-u",
                        USER,
                        "-g",
                        USER,
                        f"--var=LOCAL_CONFDIR={self.dir}",
                        f"--var=RUNDIR={self.dir / 'run'}",
                        f"--var=DBDIR={self.dir / 'db'}",
                        f"--var=LOGDIR={self.dir / 'log'}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RspamdError(f"rspamd exited ({self._process.returncode}): {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ping", timeout=1.0).text.strip() == "pong":
                    return
            time.sleep(0.1)
        raise RspamdError(f"rspamd did not answer /ping in {START_TIMEOUT:.0f} s: {self.output()}")

    def output(self, tail: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def check(self, message: bytes, **headers: str) -> dict[str, object]:
        """rspamd's verdict on a message (for tests that look at what it says directly)."""
        reply = httpx.post(f"{self.url}/checkv2", content=message, headers=headers, timeout=30)
        reply.raise_for_status()
        result: dict[str, object] = reply.json()
        return result

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # rspamd's main process stops its workers on SIGTERM
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.dns.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def rspamd_session() -> Iterator[Rspamd]:
    """The body of a session-scoped fixture: one private rspamd for every test that asks
    (its first start compiles rules; later tests pay nothing). Raises RspamdError when the
    binary is absent; the fixture turns that into a skip naming the package."""
    with Rspamd() as running:
        yield running
