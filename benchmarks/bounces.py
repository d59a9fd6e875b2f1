"""Bounce parsing: speed on the corpus, and the scores (plain, leave-one-family-out, real MTAs).

python benchmarks/bounces.py speed [-n 10]          messages per second over the corpus
python benchmarks/bounces.py score                   DEV plain and leave-one-family-out
python benchmarks/bounces.py score --generate        ... and bounces made here by Postfix,
                                                     Exim and OpenSMTPD (needs root, apt)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from postbode.bounces import evaluate  # noqa: E402
from postbode.bounces.classify import clear_memo, load_rules  # noqa: E402
from postbode.bounces.parse import parse, parse_for_scoring  # noqa: E402

CORPUS = REPO_ROOT.parent / "shared" / "bounce-corpus"
GENERATOR = REPO_ROOT / "tests" / "functional" / "bounces" / "mta_bounces.py"
FIGURES = ("detection_precision", "detection_recall", "recipient", "status", "reason", "hard")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mta_bounces", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def speed(args: argparse.Namespace) -> None:
    raws = [p.read_bytes() for p in sorted((args.corpus / "eml").rglob("*.eml"))]
    if not raws:
        sys.exit(f"no .eml files under {args.corpus / 'eml'}")
    load_rules()  # compile the rules outside the timed loop
    parse(raws[0])
    kinds: dict[str, int] = {}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    start = time.perf_counter()
    cpu = time.process_time()
    for _ in range(args.n):
        # Each pass starts without remembered classifications: only the copies of one
        # message within the corpus (LF, CRLF, CR) share them, as repeated replies would.
        clear_memo()
        for raw in raws:
            kind = parse(raw).kind
            kinds[kind] = kinds.get(kind, 0) + 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    total = len(raws) * args.n
    print(f"parsed {total} messages ({len(raws)} files x {args.n}) in {elapsed:.3f} s")
    print(f"{total / elapsed:,.0f} messages/s, {elapsed / total * 1e6:.0f} us/message")
    print(f"{total / cpu:,.0f} messages per CPU-second (the steadier figure on a busy machine)")
    print("kinds: " + ", ".join(f"{k}={v // args.n}" for k, v in sorted(kinds.items())))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _row(name: str, report: dict[str, Any], extra: str = "") -> str:
    h = evaluate.headline(report)
    cells = " | ".join("-" if h[k] is None else f"{h[k]:.3f}" for k in FIGURES)
    return f"| {name} | {report['bounces']} | {cells} |{extra}"


def score(args: argparse.Namespace) -> None:
    gen = _generator()
    published = gen.published_texts()
    print("| corpus | bounces | detection P | detection R | recipient | status | reason | hard |")
    print("|---|---|---|---|---|---|---|---|")
    plain, _ = evaluate.plain(args.corpus)
    print(_row("DEV, plain", plain))
    lofo, _, dropped = evaluate.leave_one_family_out(args.corpus, published=published)
    print(_row("DEV, leave one family out", lofo))
    strict, _, dropped_strict = evaluate.leave_one_family_out(args.corpus)
    print(_row("DEV, leave one family out, strict", strict))
    if args.generate or args.generated:
        out = args.generated or Path(tempfile.mkdtemp(prefix="postbode-real-bounces-"))
        try:
            if args.generate:
                gen.write_corpus(out, args.mta or sorted(gen.MTAS))
            scorer = evaluate.load_scorer(args.corpus)
            labels = evaluate.load_labels(scorer, out)
            for mta in sorted({label["family"] for label in labels}):
                members = [label for label in labels if label["family"] == mta]
                results = [
                    (label["file"], parse_for_scoring(Path(label["_path"]).read_bytes()), None)
                    for label in members
                ]
                report, _ = scorer.score(members, results)
                print(_row(f"real MTA: {mta}", report))
        finally:
            if args.generate and not args.generated:
                shutil.rmtree(out, ignore_errors=True)
    lost = sum(dropped.values())
    lost_strict = sum(dropped_strict.values())
    print(
        f"\nleft-out phrases: {lost} over {len(dropped)} families "
        f"({lost_strict} when published replies do not count)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--corpus", type=Path, default=CORPUS, help="labelled corpus (labels.jsonl, eml/, score.py)"
    )
    sub = ap.add_subparsers(dest="command")
    sp = sub.add_parser("speed", help="messages per second over the corpus")
    sp.add_argument("-n", type=int, default=10, help="passes over the corpus (default 10)")
    sc = sub.add_parser("score", help="plain, leave-one-family-out and real-MTA scores")
    sc.add_argument("--generate", action="store_true", help="make real-MTA bounces first")
    sc.add_argument("--generated", type=Path, help="a corpus the generator wrote earlier")
    sc.add_argument("--mta", action="append", help="with --generate: these MTAs only")
    args = ap.parse_args()
    if args.command == "score":
        score(args)
    else:
        if args.command is None:
            args.n = 10
        speed(args)


if __name__ == "__main__":
    main()
