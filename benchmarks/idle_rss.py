"""Resident memory of an idle `postbode serve` on an empty SQLite store: prints RSS and PSS
(proportional set size: shared pages divided among the processes that share them) for each
of its processes and in total; with `--mail N`, again once N messages went through it and
the worker processes it started for them left."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from postbode.testing.process import PostbodeProcess
from postbode.testing.sink import SmtpSink


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def memory_kib(pid: int) -> dict[str, int]:
    """Rss and Pss of one process, in KiB (from /proc/PID/smaps_rollup)."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            figures[key] = int(rest.split()[0])
    return figures


def describe(pid: int) -> str:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode() for a in args if a]
    return " ".join(w for w in words[1:] if not w.startswith("-")) or words[0]


def report(title: str, pid: int) -> None:
    print(f"{title} (load average {os.getloadavg()[0]:.2f})")
    total = {"Rss": 0, "Pss": 0}
    for p in process_tree(pid):
        mem = memory_kib(p)
        for key in total:
            total[key] += mem.get(key, 0)
        print(
            f"  pid {p:>7}  RSS {mem.get('Rss', 0) / 1024:6.1f} MiB"
            f"  PSS {mem.get('Pss', 0) / 1024:6.1f} MiB  {describe(p)}"
        )
    print(f"  total: RSS {total['Rss'] / 1024:.1f} MiB, PSS {total['Pss'] / 1024:.1f} MiB")


def postbode_cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def send_mail(server: PostbodeProcess, app: dict[str, str], n: int, connections: int) -> None:
    """n messages over `connections` SMTP clients (as benchmarks/relay.py sends them), until
    the sink has them all; then until the worker processes serve started for them left."""
    import relay

    relay.run(
        relay.load(
            "127.0.0.1",
            server.smtp_port,
            app["smtp_username"],
            app["smtp_password"],
            relay.make_messages(n, 2048),
            connections,
            relay.Client(pipelining=False, per_connection=100, starttls=False),
        )
    )
    print(f"{n} messages accepted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    parser.add_argument(
        "--mail", type=int, default=0, help="then send this many messages and measure again"
    )
    parser.add_argument("-c", type=int, default=10, help="SMTP connections sending --mail")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SmtpSink() as sink:
        env: dict[str, str] = {}
        app: dict[str, str] = {}
        if args.mail:  # an app to send as (made before serve starts, which then migrates not)
            setup = {"POSTBODE_DATA_DIR": tmp, "POSTBODE_LOG_LEVEL": "warning"}
            app = json.loads(postbode_cli(setup, "app", "create", "bench", "--json"))
            postbode_cli(setup, "domain", "add", "shop.test", "--app", "bench")
            env = {
                "POSTBODE_TRANSPORT_MAP": f"dest.test={sink.host}:{sink.port}",
                "POSTBODE_DNS_NAMESERVERS": "127.0.0.1:9",  # never asked: the map routes all
                "POSTBODE_SHAPING_RATE_PER_MINUTE": "0",
                "POSTBODE_SHAPING_MAX_CONNECTIONS": "0",
            }
        server = PostbodeProcess(Path(tmp), env)
        started = time.monotonic()
        server.start()
        print(f"healthy after {time.monotonic() - started:.2f} s")
        time.sleep(args.settle)  # idle on purpose: this measures the resting footprint
        assert server.proc is not None
        report("idle after start", server.proc.pid)
        if args.mail:
            send_mail(server, app, args.mail, args.c)
            seen: set[int] = set()
            while len(sink.messages) < args.mail:
                seen.update(server.children("worker"))
                time.sleep(0.1)
            print(f"{args.mail} delivered; serve started {len(seen)} worker processes for them")
            began = time.monotonic()
            while server.children("worker"):
                time.sleep(0.5)
            print(f"the last worker process left {time.monotonic() - began:.0f} s later")
            time.sleep(args.settle)
            report("idle after the mail", server.proc.pid)
        server.stop()


if __name__ == "__main__":
    main()
