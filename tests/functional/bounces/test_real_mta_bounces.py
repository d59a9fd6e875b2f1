"""The bounce parser on bounces that real MTAs (Postfix, Exim, OpenSMTPD) write here for
published real-world refusals: a second labelled corpus, its categories known by construction."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from postbode.bounces import evaluate
from postbode.bounces.parse import parse

HERE = Path(__file__).resolve().parent
SCORER_DIR = HERE.parents[2].parent / "shared" / "bounce-corpus"

pytestmark = [
    pytest.mark.xdist_group("real-mta-bounces"),
    pytest.mark.skipif(
        not (SCORER_DIR / "score.py").is_file(), reason=f"corpus scorer not found at {SCORER_DIR}"
    ),
]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mta_bounces", HERE / "mta_bounces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module", params=sorted(gen.MTAS))
def corpus(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    out = Path(tempfile.mkdtemp(prefix="postbode-real-bounces-"))
    try:
        gen.write_corpus(out, [request.param])
        yield request.param, out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _labels(out: Path) -> list[dict[str, Any]]:
    scorer = evaluate.load_scorer(SCORER_DIR)
    return evaluate.load_labels(scorer, out)


def test_every_refusal_came_back_as_a_bounce(corpus: tuple[str, Path]) -> None:
    mta, out = corpus
    planned = gen.plan([r for r in gen.load_refusals() if r.stage in gen.MTAS[mta].stages])
    got = {Path(label["file"]).stem for label in _labels(out)}
    assert got == {case.name for case in planned}


def test_category_and_hard_soft_per_mta(corpus: tuple[str, Path]) -> None:
    mta, out = corpus
    report, errors = evaluate.plain(out, scorer_dir=SCORER_DIR)
    figures = evaluate.headline(report)
    assert figures["detection_recall"] == 1.0
    assert figures["recipient"] == 1.0
    misses = {kind: errors[kind] for kind in ("reason", "hard")}
    # Every MTA: category >= 0.95 and hard/soft >= 0.98 on replies it has never been fitted to.
    assert figures["reason"] is not None and figures["reason"] >= 0.95, (mta, misses)
    assert figures["hard"] is not None and figures["hard"] >= 0.98, (mta, misses)
    if mta in ("postfix", "exim"):  # both name the SMTP command every refusal answered
        assert figures["reason"] == 1.0 and figures["hard"] == 1.0, (mta, misses)


def test_each_recipient_of_a_multi_recipient_bounce_keeps_its_own_reason(
    corpus: tuple[str, Path],
) -> None:
    mta, out = corpus
    report = parse((out / "eml" / mta / "multi.eml").read_bytes())
    got = {r.recipient: (r.category, r.hard) for r in report.records}
    assert got == {
        "multi-gmail-no-such-user@dest.test": ("user_unknown", True),
        "multi-gmail-over-quota@dest.test": ("mailbox_full", False),
        "multi-postfix-relay-denied@dest.test": ("blocked", False),
    }
