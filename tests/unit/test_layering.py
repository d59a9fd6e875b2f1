"""The layering rules, read from the code's own imports: pipeline packages know no web layer,
settings know no database (and the reverse), the two queue loops come from the runner, and no
module reaches into another package's private names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "postbode"

PIPELINE = [
    "ingest",
    "store",
    "events",
    "delivery",
    "bounces",
    "webhooks",
    "tracking",
    "stats",
    "inbound",
    "abuse",
    "privacy",
    "runner",
    "templates",
]

# (importing part, imported part): never
NEVER = [
    *((part, "web") for part in PIPELINE),
    ("config", "store"),
    ("store", "config"),
    ("store", "ingest"),
    ("store", "delivery"),
    ("events", "delivery"),
    ("ingest", "delivery"),
    ("delivery", "ingest"),
    ("webhooks", "delivery"),
    ("delivery", "webhooks"),
    ("runner", "delivery"),
    ("runner", "webhooks"),
]


def part_of(module: str) -> str:
    """`postbode.web.api.messages` -> `web`; `postbode.config` -> `config`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, nested
    ones (inside functions) included."""
    tree = ast.parse(path.read_text(), str(path))
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names], node.lineno


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "migrations" not in p.parts)


def test_the_scan_sees_the_imports_it_judges() -> None:
    """The scan itself: the web app imports pipeline parts, so the rules are not vacuous."""
    seen = {
        part_of(module)
        for module, _, _ in imports(SRC / "web" / "app.py")
        if module.startswith("postbode.")
    }
    assert {"ingest", "store", "config", "tracking"} <= seen


@pytest.mark.parametrize(("importer", "imported"), NEVER, ids=lambda v: str(v))
def test_never(importer: str, imported: str) -> None:
    broken = []
    for path in sources():
        me = module_name(path)
        if part_of(me) != importer:
            continue
        for module, _, line in imports(path):
            if module.startswith("postbode.") and part_of(module) == imported:
                broken.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}")
    assert not broken, f"{importer} must never import {imported}:\n" + "\n".join(broken)


def test_no_module_takes_another_packages_private_names() -> None:
    broken = []
    for path in sources():
        me = module_name(path)
        for module, names, line in imports(path):
            if not module.startswith("postbode") or module == me:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    broken.append(f"{path.relative_to(SRC.parent)}:{line} takes {module}.{name}")
    assert not broken, "\n".join(broken)
