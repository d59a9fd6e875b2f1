"""The multi-node fault drill, as a person runs it: two serve nodes and a worker on a private
PostgreSQL cluster, a node killed with kill -9 and PostgreSQL restarted under load; prints the
counts. Needs root and Debian's PostgreSQL (pg_createcluster).

    python benchmarks/drill.py [--messages 10000] [--lease-seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from postbode.testing import drill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--lease-seconds", type=int, default=10)
    args = parser.parse_args()
    why = drill.available()
    if why:
        print(f"cannot run the drill here: {why}")
        return 2
    with tempfile.TemporaryDirectory(prefix="postbode-drill-") as tmp:
        report = drill.run(Path(tmp), args.messages, lease_seconds=args.lease_seconds)
    for line in drill.main_lines(report):
        print(line)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
