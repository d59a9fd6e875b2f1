"""A/B tests of a template: variants with weights, figures per variant from the store, a
two-proportion z-test on the open rate with its confidence interval, and a verdict; ending a
test makes the winner the template's live version."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import (
    ab_tests,
    ab_variants,
    deliveries,
    events,
    messages,
    template_versions,
    templates,
    utcnow,
)
from postbode.templates.manage import TemplateError, resolve, update_template
from postbode.templates.render import Source, check

MIN_SAMPLE = 100  # delivered messages per variant before any verdict
CONFIDENCE = 0.95
MAX_VARIANTS = 10
_NOT_SENT = ("suppressed", "cancelled")


@dataclass(frozen=True)
class Comparison:
    """`a` against `b`: the difference of their rates (a - b), the half width of its
    confidence interval (Wald, unpooled), and the two-sided p-value of the pooled z-test."""

    difference: float
    half_width: float
    p_value: float
    z: float


def compare(
    a_hits: int, a_n: int, b_hits: int, b_n: int, confidence: float = CONFIDENCE
) -> Comparison:
    """The two-proportion z-test of a_hits/a_n against b_hits/b_n (pure)."""
    p1, p2 = a_hits / a_n, b_hits / b_n
    pooled = (a_hits + b_hits) / (a_n + b_n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / a_n + 1 / b_n))
    diff = p1 - p2
    if se_pooled == 0:
        z, p_value = 0.0, 1.0
    else:
        z = diff / se_pooled
        p_value = 2 * (1 - NormalDist().cdf(abs(z)))
    se = math.sqrt(p1 * (1 - p1) / a_n + p2 * (1 - p2) / b_n)
    quantile = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    return Comparison(diff, quantile * se, p_value, z)


def verdict(variants: list[dict[str, Any]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The verdict on figures per variant (`name`, `delivered`, `opened`): the best open rate
    against the next best, once every variant has MIN_SAMPLE delivered (pure)."""
    percent = round(confidence * 100)
    base: dict[str, Any] = {
        "metric": "open_rate",
        "confidence": confidence,
        "min_sample": MIN_SAMPLE,
        "decided": False,
        "winner": None,
        "difference_points": None,
        "interval_points": None,
        "p_value": None,
    }
    small = [v for v in variants if v["delivered"] < MIN_SAMPLE]
    if small:
        counts = ", ".join(f"{v['name']} has {v['delivered']}" for v in small)
        return {
            **base,
            "text": f"keep testing (n too small: {MIN_SAMPLE} delivered per variant needed; "
            f"{counts})",
        }
    ranked = sorted(variants, key=lambda v: v["opened"] / v["delivered"], reverse=True)
    best, second = ranked[0], ranked[1]
    c = compare(
        best["opened"], best["delivered"], second["opened"], second["delivered"], confidence
    )
    points, width = c.difference * 100, c.half_width * 100
    figures = {
        **base,
        "difference_points": round(points, 2),
        "interval_points": [round(points - width, 2), round(points + width, 2)],
        "p_value": c.p_value,
    }
    if c.p_value < 1 - confidence:
        return {
            **figures,
            "decided": True,
            "winner": best["name"],
            "text": f"{best['name']}'s open rate is higher, {percent} % confidence, "
            f"{points:+.1f} points ±{width:.1f}",
        }
    return {
        **figures,
        "text": f"keep testing (no clear difference at {percent} % confidence: "
        f"{best['name']} {points:+.1f} points ±{width:.1f} over {second['name']})",
    }


# -- the store ------------------------------------------------------------------------------------


def create_test(
    store: Store,
    app_id: int,
    *,
    template: str,
    variants: list[dict[str, Any]],
    name: str = "",
) -> dict[str, Any]:
    """A running test of `template` with `variants` ({name, subject?, html?, text?, weight});
    each send of the template picks one by a stable hash of (test, recipient)."""
    if not 2 <= len(variants) <= MAX_VARIANTS:
        raise TemplateError(f"2 to {MAX_VARIANTS} variants", field="variants")
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise TemplateError("variant names must differ", field="variants")
    with store.write() as conn:
        try:
            resolved = resolve(conn, app_id, template)
        except TemplateError as exc:
            raise TemplateError(exc.message, code=exc.code, field="template") from None
        for i, v in enumerate(variants):
            source = Source(
                subject=v.get("subject") or resolved.source.subject,
                html=v.get("html") if v.get("html") is not None else resolved.source.html,
                text=v.get("text") if v.get("text") is not None else resolved.source.text,
            )
            errors = check(source, resolved.layout)
            if errors:
                raise TemplateError(
                    str(errors[0]),
                    code="template_syntax",
                    field=f"variants.{i}.{errors[0].part}",
                    errors=[e.as_json() for e in errors],
                )
        running = conn.execute(
            select(ab_tests.c.id).where(
                ab_tests.c.template_id == resolved.template_id, ab_tests.c.status == "running"
            )
        ).first()
        if running is not None:
            raise TemplateError(
                f"test {running.id} of {template!r} is running: end it first",
                code="conflict",
                field="template",
                status=409,
            )
        test_id = conn.execute(
            insert(ab_tests)
            .values(
                app_id=app_id,
                template_id=resolved.template_id,
                name=name,
                status="running",
                created_at=utcnow(),
            )
            .returning(ab_tests.c.id)
        ).scalar_one()
        conn.execute(
            insert(ab_variants),
            [
                {
                    "test_id": test_id,
                    "name": v["name"],
                    "subject": v.get("subject"),
                    "html": v.get("html"),
                    "text": v.get("text"),
                    "weight": v["weight"],
                }
                for v in variants
            ],
        )
    return get_test(store, app_id, test_id)


def _test_row(conn: Connection, app_id: int, test_id: int) -> Any:
    row = conn.execute(
        select(ab_tests, templates.c.alias)
        .join(templates, templates.c.id == ab_tests.c.template_id)
        .where(ab_tests.c.id == test_id, ab_tests.c.app_id == app_id)
    ).first()
    if row is None:
        raise TemplateError(f"no A/B test {test_id}", code="not_found", field="id", status=404)
    return row


def figures(conn: Connection, test_id: int) -> dict[str, dict[str, int]]:
    """Per variant: sent, delivered, opened (by people: bots' opens are not counted),
    clicked (by people), unsubscribed; each a number of deliveries."""
    out: dict[str, dict[str, int]] = {}

    def of(name: str) -> dict[str, int]:
        return out.setdefault(
            name,
            {"sent": 0, "delivered": 0, "opened": 0, "clicked": 0, "unsubscribed": 0},
        )

    mine = messages.c.ab_test_id == test_id
    for variant, status, n in conn.execute(
        select(messages.c.ab_variant, deliveries.c.status, func.count())
        .join(deliveries, deliveries.c.message_id == messages.c.id)
        .where(mine)
        .group_by(messages.c.ab_variant, deliveries.c.status)
    ):
        if status in _NOT_SENT or variant is None:
            continue
        of(variant)["sent"] += n
        if status == "delivered":
            of(variant)["delivered"] += n
    seen: dict[str, set[tuple[str, Any]]] = {}
    kinds = {
        str(EventType.MESSAGE_OPENED): "opened",
        str(EventType.MESSAGE_CLICKED): "clicked",
        str(EventType.MESSAGE_UNSUBSCRIBED): "unsubscribed",
    }
    for variant, kind, delivery_id, data in conn.execute(
        select(messages.c.ab_variant, events.c.type, events.c.delivery_id, events.c.data)
        .join(messages, messages.c.id == events.c.message_id)
        .where(mine, events.c.type.in_(list(kinds)))
    ):
        if variant is None or (data or {}).get("bot"):
            continue
        seen.setdefault(variant, set()).add((kinds[kind], delivery_id))
    for variant, hits in seen.items():
        for kind, _ in hits:
            of(variant)[kind] += 1
    return out


def _test_json(conn: Connection, row: Any) -> dict[str, Any]:
    variants = conn.execute(
        select(ab_variants).where(ab_variants.c.test_id == row.id).order_by(ab_variants.c.id)
    ).all()
    counts = figures(conn, row.id)
    shown = []
    for v in variants:
        f = counts.get(
            v.name, {"sent": 0, "delivered": 0, "opened": 0, "clicked": 0, "unsubscribed": 0}
        )
        delivered = f["delivered"]
        shown.append(
            {
                "name": v.name,
                "weight": v.weight,
                "subject": v.subject,
                "html": v.html,
                "text": v.text,
                **f,
                "open_rate": f["opened"] / delivered if delivered else None,
                "click_rate": f["clicked"] / delivered if delivered else None,
            }
        )
    return {
        "id": row.id,
        "template": row.alias,
        "name": row.name,
        "status": row.status,
        "winner": row.winner,
        "created_at": row.created_at,
        "ended_at": row.ended_at,
        "variants": shown,
        "verdict": verdict(shown),
    }


def get_test(store: Store, app_id: int, test_id: int) -> dict[str, Any]:
    with store.read() as conn:
        return _test_json(conn, _test_row(conn, app_id, test_id))


def list_tests(store: Store, app_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(ab_tests, templates.c.alias)
            .join(templates, templates.c.id == ab_tests.c.template_id)
            .where(ab_tests.c.app_id == app_id)
            .order_by(ab_tests.c.id.desc())
        ).all()
        return [_test_json(conn, r) for r in rows]


def end_test(store: Store, app_id: int, test_id: int, winner: str | None = None) -> dict[str, Any]:
    """End the test; the winner (given, else the verdict's) becomes the template's live
    version: the live version with the winner's subject and bodies."""
    with store.read() as conn:
        row = _test_row(conn, app_id, test_id)
        current = _test_json(conn, row)
    if row.status != "running":
        raise TemplateError("the test has ended already", code="conflict", status=409)
    if winner is None:
        winner = current["verdict"]["winner"]
        if winner is None:
            raise TemplateError(
                f"no verdict yet ({current['verdict']['text']}): name the winner",
                code="no_verdict",
                field="winner",
                status=409,
            )
    chosen = next((v for v in current["variants"] if v["name"] == winner), None)
    if chosen is None:
        raise TemplateError(f"no variant {winner!r}", field="winner")
    with store.read() as conn:
        live = resolve(conn, app_id, row.alias)
        layout = conn.execute(
            select(template_versions.c.layout).where(
                template_versions.c.template_id == live.template_id,
                template_versions.c.version == live.version,
            )
        ).scalar_one()
    update_template(
        store,
        app_id,
        row.alias,
        subject=chosen["subject"] or live.source.subject,
        html=chosen["html"] if chosen["html"] is not None else live.source.html,
        text=chosen["text"] if chosen["text"] is not None else live.source.text,
        layout=layout,
        live=True,
    )
    with store.write() as conn:
        conn.execute(
            update(ab_tests)
            .where(ab_tests.c.id == test_id, ab_tests.c.status == "running")
            .values(status="ended", winner=winner, ended_at=utcnow())
        )
    return get_test(store, app_id, test_id)
