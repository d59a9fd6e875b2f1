"""Benchmark: parse the whole bounce corpus N times and print messages per second."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode.bounces.parse import parse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="passes over the corpus (default 10)")
    ap.add_argument(
        "--corpus",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "bounce-corpus" / "eml",
        help="folder of .eml files (default: ../shared/bounce-corpus/eml)",
    )
    args = ap.parse_args()
    raws = [p.read_bytes() for p in sorted(args.corpus.rglob("*.eml"))]
    if not raws:
        sys.exit(f"no .eml files under {args.corpus}")
    parse(raws[0])  # load and compile the rules outside the timed loop
    kinds: dict[str, int] = {}
    start = time.perf_counter()
    for _ in range(args.n):
        for raw in raws:
            kind = parse(raw).kind
            kinds[kind] = kinds.get(kind, 0) + 1
    elapsed = time.perf_counter() - start
    total = len(raws) * args.n
    print(f"parsed {total} messages ({len(raws)} files x {args.n}) in {elapsed:.3f} s")
    print(f"{total / elapsed:,.0f} messages/s, {elapsed / total * 1e6:.0f} us/message")
    print("kinds: " + ", ".join(f"{k}={v // args.n}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
