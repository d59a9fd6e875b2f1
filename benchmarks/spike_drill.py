"""The leaked-key drill, as a person runs it: a `postbode serve` on a fresh store, an app with a
week of ordinary history (seeded statistics), then a burst through one API key and one SMTP
login; prints how many messages got in before the hold, when the spike alert reached the
webhook, what a kill -9 kept, and what the owner's release sent.

    python benchmarks/spike_drill.py [--messages 3000] [--database-url postgresql://…]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from postbode.testing import spike_drill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--history-per-minute", type=float, default=2.0)
    parser.add_argument(
        "--database-url", default=None, help="an empty PostgreSQL database (default: SQLite)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="postbode-spike-") as tmp:
        report = spike_drill.run(
            Path(tmp),
            args.database_url,
            messages_in_burst=args.messages,
            history_per_minute=args.history_per_minute,
        )
    for line in report.lines():
        print(line)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
