"""Resident memory of an idle `postbode serve` on an empty SQLite store: prints the figures."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from postbode.testing.process import PostbodeProcess


def rss_mib(pid: int) -> float:
    """VmRSS of a process and its children, in MiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before measuring")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = PostbodeProcess(Path(tmp))
        started = time.monotonic()
        server.start()
        ready = time.monotonic() - started
        time.sleep(args.settle)  # idle on purpose: this measures the resting footprint
        assert server.proc is not None
        print(f"healthy after {ready:.2f} s; idle RSS {rss_mib(server.proc.pid):.1f} MiB")
        server.stop()


if __name__ == "__main__":
    main()
