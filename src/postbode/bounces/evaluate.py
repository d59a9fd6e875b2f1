"""Bounce parser evaluation on a labelled corpus: the plain score and leave-one-family-out."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from postbode.bounces.classify import Rules, load_rules, normalize_text
from postbode.bounces.parse import message_text, parse_for_scoring

# The scorer lives beside each corpus (score.py): the corpus owners' definition of every
# figure, loaded as it is rather than copied.
Scorer = ModuleType


def load_scorer(corpus: Path) -> Scorer:
    """The corpus's own score.py as a module."""
    path = corpus / "score.py"
    spec = importlib.util.spec_from_file_location(f"bounce_score_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def load_labels(scorer: Scorer, corpus: Path) -> list[dict[str, Any]]:
    """The corpus's labels, each with `_path` set to its message file."""
    labels: list[dict[str, Any]] = scorer.load_labels(str(corpus))
    for label in labels:
        label["_path"] = str(corpus / "eml" / label["file"])
    return labels


def _run(
    scorer: Scorer, labels: list[dict[str, Any]], parse: Callable[[bytes], dict[str, Any]]
) -> list[Any]:
    def one(path: str) -> dict[str, Any]:
        return parse(Path(path).read_bytes())

    results: list[Any] = scorer.run_all(one, labels, 1)
    return results


def plain(corpus: Path, rules: Rules | None = None, *, scorer_dir: Path | None = None) -> Any:
    """The scorer's report (and its error lists) for the parser with `rules` on `corpus`.
    `scorer_dir`: where score.py is, when the corpus has none of its own."""
    scorer = load_scorer(scorer_dir or corpus)
    labels = load_labels(scorer, corpus)
    results = _run(scorer, labels, lambda raw: parse_for_scoring(raw, rules))
    return scorer.score(labels, results)


def phrase_families(
    labels: Iterable[dict[str, Any]], rules: Rules
) -> dict[tuple[str, str], set[str]]:
    """For every text alternative of the rules: the families with a sample that contains it."""
    compiled = [(pair, re.compile(_lower(pair[1]))) for pair in rules.patterns()]
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for label in labels:
        text = normalize_text(message_text(Path(label["_path"]).read_bytes()))
        for pair, regex in compiled:
            if regex.search(text):
                seen[pair].add(label["family"])
    return dict(seen)


def _lower(pattern: str) -> str:
    out: list[str] = []
    escaped = False
    for ch in pattern:
        out.append(ch if escaped else ch.lower())
        escaped = not escaped and ch == "\\"
    return "".join(out)


def published_phrases(rules: Rules, published: Iterable[str]) -> set[tuple[str, str]]:
    """The text alternatives that match at least one published reply text (a provider's or
    an RFC's own words): they owe nothing to the corpus."""
    texts = [normalize_text(t) for t in published]
    return {
        pair for pair in rules.patterns() if any(re.search(_lower(pair[1]), text) for text in texts)
    }


def held_out_rules(
    rules: Rules,
    family: str,
    seen: dict[tuple[str, str], set[str]],
    published: set[tuple[str, str]] | None = None,
) -> tuple[Rules, int]:
    """The rules as they would be had `family`'s samples never been seen: without the rules
    tagged with it, and without every phrase that no other family's sample contains and no
    published reply text backs (whatever source its rule cites). Returns the rules and how
    many phrases went."""
    keep = published or set()
    gone = [pair for pair, families in seen.items() if families == {family} and pair not in keep]
    return rules.without([family], gone), len(gone)


def leave_one_family_out(
    corpus: Path,
    rules: Rules | None = None,
    *,
    published: Iterable[str] = (),
    scorer_dir: Path | None = None,
) -> tuple[Any, Any, dict[str, int]]:
    """Score every family with the rules less what only that family could have taught
    (phrases backed by a `published` reply text stay). Returns the combined report, its
    errors, and how many phrases each family lost."""
    base = rules if rules is not None else load_rules()
    scorer = load_scorer(scorer_dir or corpus)
    labels = load_labels(scorer, corpus)
    seen = phrase_families(labels, base)
    backed = published_phrases(base, published)
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for label in labels:
        by_family[label["family"]].append(label)
    results: list[Any] = []
    dropped: dict[str, int] = {}
    for family, members in sorted(by_family.items()):
        held_out, dropped[family] = held_out_rules(base, family, seen, backed)
        results += _run(scorer, members, _parser(held_out))
    report, errors = scorer.score(labels, results)
    return report, errors, dropped


def _parser(rules: Rules) -> Callable[[bytes], dict[str, Any]]:
    def parse(raw: bytes) -> dict[str, Any]:
        return parse_for_scoring(raw, rules)

    return parse


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The figures the issue tracks, from a scorer report."""
    acc = report["accuracy"]
    return {
        "detection_precision": report["detection"]["precision"],
        "detection_recall": report["detection"]["recall"],
        "recipient": acc["recipient"]["accuracy"],
        "status": acc["status"]["accuracy"],
        "reason": acc["reason"]["accuracy"],
        "reason_unhinted": acc["reason_unhinted"]["accuracy"],
        "hard": acc["hard"]["accuracy"],
    }
