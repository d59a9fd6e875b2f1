"""What a send with a template needs: the template resolved once per request (with its layout
and any running A/B test), then one rendering per recipient."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, select

from postbode.store.engine import Store
from postbode.store.schema import ab_tests, ab_variants
from postbode.templates.manage import Resolved, TemplateError, render_resolved, resolve
from postbode.templates.render import Rendered, Source

MAX_MODEL_BYTES = 256 * 1024  # a model as JSON, at most


@dataclass(frozen=True)
class Variant:
    name: str
    weight: int
    subject: str | None
    html: str | None
    text: str | None


@dataclass(frozen=True)
class AbTest:
    id: int
    variants: tuple[Variant, ...]

    def pick(self, recipient: str) -> Variant:
        """The recipient's variant: a stable hash of (test, address) against the weights, so a
        person always sees the same one."""
        digest = hashlib.sha256(f"{self.id}:{recipient.lower()}".encode()).digest()
        total = sum(v.weight for v in self.variants)
        point = int.from_bytes(digest[:8], "big") % total
        for variant in self.variants:
            if point < variant.weight:
                return variant
            point -= variant.weight
        return self.variants[-1]


@dataclass(frozen=True)
class Made:
    """One recipient's rendering and the names it is recorded under."""

    rendered: Rendered
    template: str
    version: int
    ab_test_id: int | None = None
    ab_variant: str | None = None


@dataclass
class TemplateCache:
    """Templates resolved for one request (a batch renders one template many times)."""

    store: Store
    app_id: int
    found: dict[str, tuple[Resolved, AbTest | None]] = field(default_factory=dict)

    def get(self, alias: str) -> tuple[Resolved, AbTest | None]:
        if alias not in self.found:
            with self.store.read() as conn:
                try:
                    resolved = resolve(conn, self.app_id, alias)
                except TemplateError as exc:
                    if exc.status == 404:
                        raise TemplateError(
                            f"no template {alias!r}", code="not_found", field="template"
                        ) from None
                    raise
                self.found[alias] = (resolved, running_test(conn, resolved.template_id))
        return self.found[alias]

    def make(self, alias: str, model: dict[str, Any], recipient: str) -> Made:
        """Render `alias` for `model` (the recipient's A/B variant, if a test runs); raises
        TemplateError naming the part and line."""
        resolved, test = self.get(alias)
        if test is None:
            return Made(render_resolved(resolved, model), alias, resolved.version)
        variant = test.pick(recipient)
        source = Source(
            subject=variant.subject if variant.subject is not None else resolved.source.subject,
            html=variant.html if variant.html is not None else resolved.source.html,
            text=variant.text if variant.text is not None else resolved.source.text,
        )
        rendered = render_resolved(replace(resolved, source=source), model)
        return Made(rendered, alias, resolved.version, test.id, variant.name)


def running_test(conn: Connection, template_id: int) -> AbTest | None:
    test = conn.execute(
        select(ab_tests.c.id)
        .where(ab_tests.c.template_id == template_id, ab_tests.c.status == "running")
        .order_by(ab_tests.c.id.desc())
    ).first()
    if test is None:
        return None
    rows = conn.execute(
        select(ab_variants).where(ab_variants.c.test_id == test.id).order_by(ab_variants.c.id)
    ).all()
    variants = tuple(Variant(r.name, r.weight, r.subject, r.html, r.text) for r in rows)
    return AbTest(test.id, variants) if variants else None


def parse_model(text: str, field: str = "model") -> dict[str, Any]:
    """A model given as JSON text (an SMTP header, a form field): an object, bounded."""
    if len(text) > MAX_MODEL_BYTES:
        raise TemplateError(f"the model is at most {MAX_MODEL_BYTES} bytes", field=field)
    try:
        model = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise TemplateError(f"the model is not JSON: {exc}", field=field) from None
    if not isinstance(model, dict):
        raise TemplateError("the model is a JSON object", field=field)
    return model
