"""Seed a store at scale: N deliveries over 90 days for several apps, COPY on PostgreSQL and
executemany on SQLite (postbode.testing.scale_seed says what is written), and print how long it
took, phase by phase.

    nice python benchmarks/seed_scale.py --fresh --rows 10000000 \\
        --url postgresql://postgres@127.0.0.1/pb_scale
    nice python benchmarks/seed_scale.py --fresh --rows 1000000 \\
        --url sqlite:////tmp/pb-scale/postbode.db

`--json FILE` keeps what was seeded (counts, seconds per phase) for benchmarks/search_scale.py."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.testing.scale_seed import seed


def prepare_postgresql(url: str, fresh: bool) -> None:
    """Create the database `url` names (dropped first with `fresh`)."""
    import psycopg

    target = make_url(url)
    admin = target.set(database="postgres", drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (target.database,)
        ).fetchone()
        if exists and fresh:
            conn.execute(f'DROP DATABASE "{target.database}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{target.database}"')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="deliveries to write")
    parser.add_argument(
        "--url", required=True, help="postgresql://… or sqlite:////path/postbode.db"
    )
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--fresh", action="store_true", help="drop the database / file first")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="write what was seeded here")
    args = parser.parse_args()

    def say(line: str) -> None:
        print(line, flush=True)

    if args.url.startswith("postgres"):
        prepare_postgresql(args.url, args.fresh)
    else:
        path = Path(make_url(args.url).database or "")
        if args.fresh:
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
    store = create_store(Settings(database_url=args.url), migrate=True, init=True)
    with store.read() as conn:
        if conn.execute(text("SELECT count(*) FROM (SELECT 1 FROM messages LIMIT 1) m")).scalar():
            sys.exit("the store already holds messages: seed an empty one (--fresh)")
    say(
        f"seeding {args.rows:,} deliveries over {args.days} days into {store.dialect} "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    info = seed(store, args.rows, args.days, random.Random(args.seed), say)
    store.dispose()
    say(json.dumps(info, indent=2))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
