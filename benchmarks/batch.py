"""Benchmark: how long `POST /api/v1/messages/batch` takes to answer for 500 recipients, each
rendered from a template with their own model, against a real `postbode serve` (SQLite)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode import tenancy  # noqa: E402
from postbode.config import Settings  # noqa: E402
from postbode.store.engine import create_store  # noqa: E402
from postbode.testing.process import PostbodeProcess  # noqa: E402

TEMPLATE = {
    "alias": "receipt",
    "subject": "Order {{ order }}",
    "html": "<html><head><style>p { margin: 0 }</style></head><body>"
    "<p>Dear {{ name }},</p><p>order {{ order }} comes to {{ total }}.</p>"
    "{% for line in lines %}<p>{{ line.item }}: {{ line.price }}</p>{% endfor %}</body></html>",
}


def batch(n: int, offset: int) -> dict[str, object]:
    return {
        "message": {"from": "orders@shop.test", "template": "receipt"},
        "recipients": [
            {
                "to": f"r{offset + i}@bench.test",
                "model": {
                    "name": f"Customer {offset + i}",
                    "order": offset + i,
                    "total": i * 3,
                    "lines": [{"item": f"item {k}", "price": k} for k in range(3)],
                },
            }
            for i in range(n)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="batches sent, one after another")
    parser.add_argument("--size", type=int, default=500, help="recipients per batch")
    parser.add_argument(
        "--command",
        default="web",
        choices=("web", "serve"),
        help="`web`: the HTTP process alone (delivery runs elsewhere, as with several "
        "processes); `serve`: every role in one, its delivery worker busy with the mail",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        store = create_store(Settings(data_dir=data))
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        store.dispose()
        # bench.test goes to a closed loopback port: only the answer is measured.
        with (
            PostbodeProcess(data) as server,
            httpx.Client(
                base_url=server.http_url,
                headers={"Authorization": f"Bearer {app.api_key}"},
                timeout=120,
            ) as http,
        ):
            http.post("/api/v1/templates", json=TEMPLATE).raise_for_status()
            times = []
            for run in range(args.runs):
                body = batch(args.size, run * args.size)
                started = time.perf_counter()
                answer = http.post("/api/v1/messages/batch", json=body)
                times.append(time.perf_counter() - started)
                answer.raise_for_status()
                assert answer.json()["accepted"] == args.size, answer.text[:500]
    print(
        f"batch of {args.size} rendered recipients, {args.runs} runs "
        f"(SQLite, postbode {args.command}):"
    )
    print(
        f"  answered in: median {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
