"""Templates in the store: create, list, read, new versions, choose the live one, delete; and
the rendering a send asks for (a template by alias with its layout, for a model)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from postbode.store.engine import Store
from postbode.store.schema import template_versions, templates, utcnow
from postbode.templates.render import Rendered, RenderError, Source, check, render

ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
MAX_VERSIONS_LISTED = 100


class TemplateError(ValueError):
    """A template request that cannot be carried out; names the field and an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid",
        field: str | None = None,
        status: int = 422,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.field, self.status = message, code, field, status
        self.errors = errors or []


@dataclass(frozen=True)
class Resolved:
    """A template as a send renders it: its live version and the layout it renders inside."""

    alias: str
    template_id: int
    version: int
    source: Source
    layout: Source | None


def check_alias(alias: str, field: str = "alias") -> str:
    if not ALIAS.match(alias):
        raise TemplateError(
            "an alias is 1 to 100 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit",
            field=field,
        )
    return alias


def _template_row(conn: Connection, app_id: int, alias: str) -> Any:
    row = conn.execute(
        select(templates).where(templates.c.app_id == app_id, templates.c.alias == alias)
    ).first()
    if row is None:
        raise TemplateError(f"no template {alias!r}", code="not_found", field="alias", status=404)
    return row


def _version_row(conn: Connection, template_id: int, version: int) -> Any:
    row = conn.execute(
        select(template_versions).where(
            template_versions.c.template_id == template_id,
            template_versions.c.version == version,
        )
    ).first()
    if row is None:
        raise TemplateError(f"no version {version}", code="not_found", field="version", status=404)
    return row


def _source(row: Any) -> Source:
    return Source(subject=row.subject, html=row.html, text=row.text)


def _layout(conn: Connection, app_id: int, alias: str | None, own: str) -> Source | None:
    if alias is None:
        return None
    if alias == own:
        raise TemplateError("a template cannot be its own layout", field="layout")
    try:
        row = _template_row(conn, app_id, alias)
    except TemplateError:
        raise TemplateError(f"no template {alias!r} for the layout", field="layout") from None
    if row.live_version is None:
        raise TemplateError(f"the layout {alias!r} has no live version", field="layout")
    version = _version_row(conn, row.id, row.live_version)
    if version.layout is not None:
        raise TemplateError(f"the layout {alias!r} has a layout itself", field="layout")
    return _source(version)


def _checked(conn: Connection, app_id: int, alias: str, fields: dict[str, Any]) -> None:
    """Refuse a version whose parts do not compile, naming the first error's part and line."""
    if fields.get("html") is None and fields.get("text") is None:
        raise TemplateError("give html or text (or both)", code="missing", field="html")
    layout = _layout(conn, app_id, fields.get("layout"), alias)
    errors = check(Source(fields["subject"], fields.get("html"), fields.get("text")), layout)
    if errors:
        first = errors[0]
        raise TemplateError(
            str(first),
            code="template_syntax",
            field=first.part,
            errors=[e.as_json() for e in errors],
        )


def _version_json(row: Any) -> dict[str, Any]:
    return {
        "version": row.version,
        "subject": row.subject,
        "html": row.html,
        "text": row.text,
        "layout": row.layout,
        "created_at": row.created_at,
    }


def _template_json(conn: Connection, row: Any) -> dict[str, Any]:
    versions = conn.execute(
        select(template_versions)
        .where(template_versions.c.template_id == row.id)
        .order_by(template_versions.c.version.desc())
        .limit(MAX_VERSIONS_LISTED)
    ).all()
    live = next((v for v in versions if v.version == row.live_version), None)
    if live is None and row.live_version is not None:
        live = _version_row(conn, row.id, row.live_version)
    shown = live or (versions[0] if versions else None)
    return {
        "id": row.id,
        "alias": row.alias,
        "name": row.name,
        "live_version": row.live_version,
        "latest_version": versions[0].version if versions else None,
        **(
            {k: v for k, v in _version_json(shown).items() if k not in ("version", "created_at")}
            if shown is not None
            else {"subject": "", "html": None, "text": None, "layout": None}
        ),
        "versions": [
            {
                "version": v.version,
                "created_at": v.created_at,
                "live": v.version == row.live_version,
            }
            for v in versions
        ],
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def create_template(
    store: Store,
    app_id: int,
    alias: str,
    *,
    subject: str,
    html: str | None = None,
    text: str | None = None,
    layout: str | None = None,
    name: str = "",
) -> dict[str, Any]:
    """A new template whose first version is live."""
    check_alias(alias)
    fields = {"subject": subject, "html": html, "text": text, "layout": layout}
    with store.write() as conn:
        exists = conn.execute(
            select(templates.c.id).where(templates.c.app_id == app_id, templates.c.alias == alias)
        ).first()
        if exists is not None:
            raise TemplateError(
                f"a template {alias!r} exists already", code="conflict", field="alias", status=409
            )
        _checked(conn, app_id, alias, fields)
        now = utcnow()
        template_id = conn.execute(
            insert(templates)
            .values(
                app_id=app_id,
                alias=alias,
                name=name,
                live_version=1,
                created_at=now,
                updated_at=now,
            )
            .returning(templates.c.id)
        ).scalar_one()
        conn.execute(
            insert(template_versions).values(
                template_id=template_id, version=1, created_at=now, **fields
            )
        )
        return _template_json(conn, _template_row(conn, app_id, alias))


def update_template(
    store: Store,
    app_id: int,
    alias: str,
    *,
    subject: str,
    html: str | None = None,
    text: str | None = None,
    layout: str | None = None,
    name: str | None = None,
    live: bool = False,
) -> dict[str, Any]:
    """A new version of the template; live at once only if `live` (else choose it later)."""
    fields = {"subject": subject, "html": html, "text": text, "layout": layout}
    with store.write() as conn:
        row = _template_row(conn, app_id, alias)
        _checked(conn, app_id, alias, fields)
        latest = conn.execute(
            select(func.max(template_versions.c.version)).where(
                template_versions.c.template_id == row.id
            )
        ).scalar_one()
        version = (latest or 0) + 1
        now = utcnow()
        conn.execute(
            insert(template_versions).values(
                template_id=row.id, version=version, created_at=now, **fields
            )
        )
        values: dict[str, Any] = {"updated_at": now}
        if live:
            values["live_version"] = version
        if name is not None:
            values["name"] = name
        conn.execute(update(templates).where(templates.c.id == row.id).values(**values))
        return _template_json(conn, _template_row(conn, app_id, alias))


def set_live(store: Store, app_id: int, alias: str, version: int) -> dict[str, Any]:
    """Make `version` the one sends render."""
    with store.write() as conn:
        row = _template_row(conn, app_id, alias)
        _version_row(conn, row.id, version)
        conn.execute(
            update(templates)
            .where(templates.c.id == row.id)
            .values(live_version=version, updated_at=utcnow())
        )
        return _template_json(conn, _template_row(conn, app_id, alias))


def list_templates(store: Store, app_id: int) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(
            select(templates).where(templates.c.app_id == app_id).order_by(templates.c.alias)
        ).all()
        return [
            {
                "id": r.id,
                "alias": r.alias,
                "name": r.name,
                "live_version": r.live_version,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
            }
            for r in rows
        ]


def get_template(store: Store, app_id: int, alias: str) -> dict[str, Any]:
    with store.read() as conn:
        return _template_json(conn, _template_row(conn, app_id, alias))


def get_version(store: Store, app_id: int, alias: str, version: int) -> dict[str, Any]:
    with store.read() as conn:
        row = _template_row(conn, app_id, alias)
        return {"alias": alias, **_version_json(_version_row(conn, row.id, version))}


def alias_of(store: Store, app_id: int, template_id: int) -> str | None:
    """The alias of the app's template with this id (the `id` the API shows)."""
    with store.read() as conn:
        found = conn.execute(
            select(templates.c.alias).where(
                templates.c.app_id == app_id, templates.c.id == template_id
            )
        ).scalar()
    return str(found) if found is not None else None


def delete_template(store: Store, app_id: int, alias: str) -> None:
    with store.write() as conn:
        row = _template_row(conn, app_id, alias)
        conn.execute(delete(templates).where(templates.c.id == row.id))


def resolve(conn: Connection, app_id: int, alias: str, version: int | None = None) -> Resolved:
    """The template `alias` of the app at `version` (default: the live one), with its layout."""
    row = _template_row(conn, app_id, alias)
    wanted = version if version is not None else row.live_version
    if wanted is None:
        raise TemplateError(f"the template {alias!r} has no live version", field="template")
    v = _version_row(conn, row.id, wanted)
    return Resolved(alias, row.id, wanted, _source(v), _layout(conn, app_id, v.layout, alias))


def render_resolved(resolved: Resolved, model: dict[str, Any]) -> Rendered:
    """Raises TemplateError naming the part and line of what went wrong."""
    try:
        return render(resolved.source, model, resolved.layout)
    except RenderError as exc:
        raise TemplateError(
            str(exc), code="template_render", field="model", errors=[exc.as_json()]
        ) from None


def validate(
    store: Store,
    app_id: int,
    *,
    alias: str | None,
    subject: str | None = None,
    html: str | None = None,
    text: str | None = None,
    layout: str | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile (and, with a model, render) a template: the stored live one when no parts are
    given, else the parts given. Errors name their part and line; never raises for them."""
    with store.read() as conn:
        if subject is None and html is None and text is None:
            if alias is None:
                raise TemplateError("give a template's parts or alias", field="subject")
            resolved = resolve(conn, app_id, alias)
            source, layout_source = resolved.source, resolved.layout
        else:
            source = Source(subject or "", html, text)
            try:
                layout_source = _layout(conn, app_id, layout, alias or "")
            except TemplateError as exc:
                return {
                    "valid": False,
                    "errors": [{"part": "layout", "line": None, "message": exc.message}],
                }
    errors = [e.as_json() for e in check(source, layout_source)]
    if source.html is None and source.text is None:
        errors.append({"part": "html", "line": None, "message": "give html or text (or both)"})
    result: dict[str, Any] = {"valid": not errors, "errors": errors}
    if not errors and model is not None:
        try:
            rendered = render(source, model, layout_source)
        except RenderError as exc:
            result.update(valid=False, errors=[exc.as_json()])
        else:
            result["rendered"] = {
                "subject": rendered.subject,
                "html": rendered.html,
                "text": rendered.text,
            }
    return result
