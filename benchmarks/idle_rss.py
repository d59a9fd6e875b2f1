"""Resident memory of an idle `postbode serve` on an empty SQLite store: prints RSS and PSS
(proportional set size: shared pages divided among the processes that share them) for each
of its processes and in total."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from postbode.testing.process import PostbodeProcess


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            children = task / "children"
            if children.exists():
                pids += [int(c) for c in children.read_text().split()]
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
        print(f"healthy after {ready:.2f} s; load average {os.getloadavg()[0]:.2f}")
        total = {"Rss": 0, "Pss": 0}
        for pid in process_tree(server.proc.pid):
            mem = memory_kib(pid)
            for key in total:
                total[key] += mem.get(key, 0)
            print(
                f"  pid {pid:>7}  RSS {mem.get('Rss', 0) / 1024:6.1f} MiB"
                f"  PSS {mem.get('Pss', 0) / 1024:6.1f} MiB  {describe(pid)}"
            )
        print(
            f"idle total: RSS {total['Rss'] / 1024:.1f} MiB, PSS {total['Pss'] / 1024:.1f} MiB"
        )
        server.stop()


if __name__ == "__main__":
    main()
