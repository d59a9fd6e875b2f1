"""Benchmark: the time rspamd's content check adds to accepting a message.

One SMTP client session submits messages one after the other to Postbode's listener (in
process, SQLite, no delivery) with and without `rspamd_url` set to a private rspamd on
loopback; rounds alternate so both see the same machine. Prints the time from the end of DATA
to the 250 per message (median, p95) each way, the difference, and rspamd's own /checkv2
time as the accept path saw it (postbode_content_scan_seconds)."""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode import tenancy  # noqa: E402
from postbode.config import Settings  # noqa: E402
from postbode.metrics import CONTENT_SCAN_SECONDS  # noqa: E402
from postbode.store.engine import create_store  # noqa: E402
from postbode.testing.rspamd import Rspamd  # noqa: E402
from postbode.testing.servers import SmtpListener  # noqa: E402

BODY = (
    "Hello Alice,\n\nyour order 1042 has shipped and should arrive on Thursday. Track it at "
    "https://shop.test/track/1042 or reply to this message.\n\nThanks for shopping with us,\n"
    "The Shop\n"
) * 8  # ~2 KB, a typical order mail


def message(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <orders@shop.test>"
    msg["To"] = f"customer{i}@bench.test"
    msg["Subject"] = f"Your order {i} has shipped"
    msg.set_content(BODY)
    msg.add_alternative(f"<html><body><p>{BODY}</p></body></html>", subtype="html")
    return msg


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_round(listener: SmtpListener, app: tenancy.NewApp, count: int, start: int) -> list[float]:
    """Seconds from the start of DATA to its reply, per message, on one session."""
    took: list[float] = []
    with smtplib.SMTP(listener.host, listener.port, timeout=60) as client:
        client.login(app.smtp_username, app.smtp_password)
        for i in range(start, start + count):
            msg = message(i)
            data = msg.as_bytes(policy=SMTP_POLICY)  # CRLF, as on the wire
            client.mail("orders@shop.test")
            client.rcpt(str(msg["To"]))
            begun = time.perf_counter()
            code, said = client.data(data)
            took.append(time.perf_counter() - begun)
            if code != 250:
                raise RuntimeError(f"message {i}: {code} {said!r}")
    return took


def scan_seconds() -> tuple[float, float]:
    """(sum, count) of postbode_content_scan_seconds so far, in this process."""
    total = count = 0.0
    for metric in CONTENT_SCAN_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, Rspamd() as rspamd:
        settings = Settings(data_dir=Path(tmp), allow_unverified_domains=True)
        store = create_store(settings)
        app = tenancy.create_app(store, "shop")
        tenancy.add_domain(store, "shop", "shop.test")
        plain = settings.model_copy(update={"rspamd_url": None})
        scored = settings.model_copy(update={"rspamd_url": rspamd.url})
        results: dict[str, list[float]] = {"without": [], "with": []}
        n = 0
        with SmtpListener(plain, store) as without, SmtpListener(scored, store) as with_:
            # warm both paths (first connections, rspamd's first scan of a kind)
            run_round(without, app, 20, n)
            run_round(with_, app, 20, n + 20)
            n += 40
            before = scan_seconds()
            for _ in range(args.rounds):
                for name, listener in (("without", without), ("with", with_)):
                    results[name] += run_round(listener, app, args.messages, n)
                    n += args.messages
            after = scan_seconds()
        store.dispose()

    load = os.getloadavg()[0]
    print(
        f"rspamd content check, {args.rounds} x {args.messages} messages each way "
        f"(~{len(message(0).as_bytes()) // 1024} KB, one SMTP session, SQLite), "
        f"load average {load:.1f}"
    )
    ms = {k: [v * 1000 for v in vs] for k, vs in results.items()}
    for name in ("without", "with"):
        print(
            f"  {name:8} rspamd: median {statistics.median(ms[name]):6.2f} ms  "
            f"p95 {percentile(ms[name], 0.95):6.2f} ms per message"
        )
    added_median = statistics.median(ms["with"]) - statistics.median(ms["without"])
    added_p95 = percentile(ms["with"], 0.95) - percentile(ms["without"], 0.95)
    print(f"  added:          median {added_median:6.2f} ms  p95 {added_p95:6.2f} ms")
    scans = after[1] - before[1]
    if scans:
        mean = (after[0] - before[0]) / scans * 1000
        print(f"  /checkv2 as the accept path waited for it: mean {mean:.2f} ms, {scans:.0f} scans")


if __name__ == "__main__":
    main()
