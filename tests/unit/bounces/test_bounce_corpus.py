"""The bounce parser scored on the shared, labelled bounce corpus (shared/bounce-corpus)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from postbode.bounces import evaluate
from postbode.bounces.parse import parse_for_scoring

REPO_ROOT = Path(__file__).resolve().parents[3]
# The repository and shared/ are siblings, here and in CI's clone.
CORPUS = REPO_ROOT.parent / "shared" / "bounce-corpus"

pytestmark = pytest.mark.skipif(
    not (CORPUS / "score.py").is_file(), reason=f"bounce corpus not found at {CORPUS}"
)


def _load_scorer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bounce_corpus_score", CORPUS / "score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    scorer = _load_scorer()
    labels = scorer.load_labels(str(CORPUS))
    for label in labels:
        label["_path"] = str(CORPUS / "eml" / label["file"])

    def run(path: str) -> dict[str, Any]:
        return parse_for_scoring(Path(path).read_bytes())

    results = scorer.run_all(run, labels, 1)
    rep, _errors = scorer.score(labels, results)
    assert isinstance(rep, dict)
    return rep


def _published_texts() -> list[str]:
    path = REPO_ROOT / "tests" / "functional" / "bounces" / "mta_bounces.py"
    spec = importlib.util.spec_from_file_location("mta_bounces", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    texts: list[str] = module.published_texts()
    return texts


@pytest.fixture(scope="module")
def held_out() -> dict[str, Any]:
    rep, _errors, _dropped = evaluate.leave_one_family_out(CORPUS, published=_published_texts())
    assert isinstance(rep, dict)
    return rep


@pytest.fixture(scope="module")
def held_out_strict() -> dict[str, Any]:
    rep, _errors, _dropped = evaluate.leave_one_family_out(CORPUS)
    assert isinstance(rep, dict)
    return rep


# The figures before the order-of-evidence classifier (issue 17): none may drop.
def test_detection_meets_the_floors(report: dict[str, Any]) -> None:
    assert report["crashes"] == 0
    assert report["detection"]["precision"] == 1.0
    assert report["detection"]["recall"] == 1.0


def test_recipient_accuracy_meets_the_floor(report: dict[str, Any]) -> None:
    assert report["accuracy"]["recipient"]["accuracy"] >= 0.996


def test_reason_accuracy_meets_the_floor(report: dict[str, Any]) -> None:
    assert report["accuracy"]["reason"]["accuracy"] >= 0.916
    # Without the samples whose address names the reason: the parser must not lean on them.
    assert report["accuracy"]["reason_unhinted"]["accuracy"] >= 0.912


def test_hard_soft_accuracy_meets_the_floor(report: dict[str, Any]) -> None:
    assert report["accuracy"]["hard"]["accuracy"] >= 0.930


def test_no_complaint_auto_reply_or_success_report_counts_as_a_bounce(
    report: dict[str, Any],
) -> None:
    assert report["detection"]["false_positives_by_kind"] == {}


def test_leaving_each_family_out_keeps_reason_and_hard_soft_above_the_floors(
    held_out: dict[str, Any],
) -> None:
    # Every family scored with the rules less each phrase only its own samples contain
    # (unless a published reply backs it): what the rules owe to the families they saw.
    assert held_out["accuracy"]["reason"]["accuracy"] >= 0.85
    assert held_out["accuracy"]["hard"]["accuracy"] >= 0.92


def test_leaving_each_family_out_strictly_stays_close(held_out_strict: dict[str, Any]) -> None:
    # Strictly: every phrase only the left-out family contains goes, published or not.
    assert held_out_strict["accuracy"]["reason"]["accuracy"] >= 0.80
    assert held_out_strict["accuracy"]["hard"]["accuracy"] >= 0.90


def test_the_literal_prefilter_never_skips_a_rule_that_would_match() -> None:
    # Every text a rule could read: each sample's whole text, in every window a rule sees,
    # and the published replies. Where a rule's expression matches, its literals are there.
    from postbode.bounces.classify import load_rules, normalize_text
    from postbode.bounces.parse import message_text

    texts = [normalize_text(t) for t in _published_texts()]
    for path in sorted((CORPUS / "eml").rglob("*.eml")):
        whole = normalize_text(message_text(path.read_bytes()))
        texts += [whole[i : i + 1000] for i in range(0, len(whole), 500)]
    rules = [r for r in load_rules().rules if r.text is not None]
    filtered = [r for r in rules if r.required is not None]
    # Most phrase rules have literals to test (else the prefilter would be doing nothing).
    assert len(filtered) >= len(rules) // 2
    matched = 0
    for rule in filtered:
        assert rule.text is not None and rule.required is not None
        for text in texts:
            if rule.text.search(text) is not None:
                matched += 1
                assert any(lit in text for lit in rule.required), (rule.name, text[:200])
    assert matched > 100
    # Each alternative of a phrase rule is searched only where its own literals are.
    from postbode.bounces.classify import _text_parts

    part_matches = 0
    for name, parts in _text_parts(load_rules()).items():
        for literals, pattern in parts:
            if literals is None:
                continue
            for text in texts:
                if pattern.search(text) is not None:
                    part_matches += 1
                    assert any(lit in text for lit in literals), (name, pattern.pattern)
    assert part_matches > 100
    # The same for the SMTP stage patterns, which read the raw text lower-cased.
    from postbode.bounces.parse import _STAGE_ALTERNATIVES

    raw = [
        message_text(path.read_bytes()).lower() for path in sorted((CORPUS / "eml").rglob("*.eml"))
    ]
    stage_matches = 0
    for _stage, pattern, literals in _STAGE_ALTERNATIVES:
        for text in raw:
            if pattern.search(text) is not None:
                stage_matches += 1
                assert any(lit in text for lit in literals), pattern.pattern
    assert stage_matches > 50
