"""The `postbode` command: run the roles, migrate, and manage apps, credentials, domains, users."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from postbode import tenancy
from postbode.config import Settings, describe, get_settings
from postbode.store.engine import Store, create_store

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Postbode: transactional mail.")
app_cmd = typer.Typer(no_args_is_help=True, help="Apps: one application's mail each.")
credential_cmd = typer.Typer(no_args_is_help=True, help="API keys and SMTP logins of an app.")
domain_cmd = typer.Typer(no_args_is_help=True, help="Sending domains and their DNS records.")
user_cmd = typer.Typer(no_args_is_help=True, help="People who use the web interface.")
app.add_typer(app_cmd, name="app")
app.add_typer(credential_cmd, name="credential")
app.add_typer(domain_cmd, name="domain")
app.add_typer(user_cmd, name="user")

err = Console(stderr=True)
out = Console()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _store() -> Store:
    try:
        return create_store(get_settings())
    except Exception as exc:  # bad URL, database down: one clear line, not a traceback
        _fail(f"cannot open the store: {exc}")


def _print_json(value: Any) -> None:
    def default(o: Any) -> str:
        return o.isoformat() if isinstance(o, datetime) else str(o)

    sys.stdout.write(json.dumps(value, default=default, indent=2) + "\n")


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


def _run(roles: list[str]) -> None:
    from postbode.roles import run_roles

    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    store = _store()
    asyncio.run(run_roles(settings, store, roles))


# -- processes -------------------------------------------------------------------------------


@app.command()
def serve() -> None:
    """Run every role in one command: HTTP API and UI, SMTP listener, delivery workers."""
    from postbode.roles import serve_roles

    _run(serve_roles(get_settings()))


@app.command()
def web() -> None:
    """Run the HTTP API and web UI."""
    _run(["web"])


@app.command()
def smtp() -> None:
    """Run the SMTP listener (submission, bounces, inbound)."""
    _require_role("smtp")
    _run(["smtp"])


@app.command()
def worker() -> None:
    """Run the queue workers (delivery, webhooks, periodic duties)."""
    _require_role("worker")
    _run(["worker"])


def _require_role(name: str) -> None:
    from postbode.roles import available_roles

    if name not in available_roles():
        _fail(f"the {name!r} role is not part of this build yet")


@app.command()
def migrate() -> None:
    """Apply database migrations (every command also does this on first use)."""
    from postbode.store.migrate import current_revision

    store = _store()
    out.print(f"schema at revision {current_revision(store)}")


@app.command("config")
def show_config(
    as_json: JsonFlag = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the settings reference as Markdown.")
    ] = False,
) -> None:
    """Print the effective settings (secrets masked)."""
    if markdown:
        sys.stdout.write(settings_markdown())
        return
    settings = get_settings()
    values = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if "secret" in name or "password" in name:
            value = (
                "********"
                if str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)
                else ""
            )
        if name == "database_url" and value and "@" in str(value):
            value = _mask_url(str(value))
        values[f"POSTBODE_{name.upper()}"] = value
    if as_json:
        _print_json(values)
    else:
        _print_table([{"setting": k, "value": v} for k, v in values.items()], ["setting", "value"])


def _mask_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:********@{host}" if ":" in creds else url


def settings_markdown() -> str:
    """docs/configuration.md, generated from the settings schema."""
    lines = [
        "# Configuration",
        "",
        "Generated from `src/postbode/config.py` by `postbode config --markdown`; do not edit.",
        "",
        "Every setting is an environment variable. The same names in lower case, without the",
        "`POSTBODE_` prefix, may also be set in a TOML file named by `POSTBODE_CONFIG`;",
        "the environment wins.",
        "",
        "| Variable | Type | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for env, typ, default, description in describe():
        lines.append(f"| `{env}` | {typ} | `{default}` | {description} |")
    return "\n".join(lines) + "\n"


# -- apps and credentials --------------------------------------------------------------------


@app_cmd.command("create")
def app_create(
    name: str,
    as_json: JsonFlag = False,
    organization: Annotated[str, typer.Option(help="Organization to create it in.")] = (
        tenancy.DEFAULT_ORGANIZATION
    ),
) -> None:
    """Create an app with an API key and an SMTP login (shown once)."""
    try:
        created = tenancy.create_app(_store(), name, organization)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(created.as_contract())
    else:
        out.print(f"app [bold]{name}[/bold] created; these secrets are shown only once:")
        for key, value in created.as_contract().items():
            out.print(f"  {key}: {value}")


@app_cmd.command("list")
def app_list(as_json: JsonFlag = False) -> None:
    """List apps."""
    rows = tenancy.list_apps(_store())
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows, ["name", "organization", "status", "domains", "credentials"])


@credential_cmd.command("create")
def credential_create(
    app_name: Annotated[str, typer.Option("--app", help="The app's name.")],
    kind: Annotated[str, typer.Option(help="api or smtp.")] = "api",
    name: Annotated[str, typer.Option(help="A label, e.g. where it is used.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Create an API key or SMTP login (the secret is shown once)."""
    try:
        created = tenancy.create_credential(_store(), app_name, kind, name)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(created)
    else:
        for key, value in created.items():
            out.print(f"{key}: {value}")


@credential_cmd.command("list")
def credential_list(
    app_name: Annotated[str, typer.Option("--app", help="The app's name.")],
    as_json: JsonFlag = False,
) -> None:
    """List an app's credentials (never their secrets)."""
    try:
        rows = tenancy.list_credentials(_store(), app_name)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows, ["id", "kind", "name", "lookup", "created_at", "revoked_at"])


@credential_cmd.command("revoke")
def credential_revoke(credential_id: int) -> None:
    """Revoke a credential by id; it stops working at once."""
    try:
        tenancy.revoke_credential(_store(), credential_id)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    out.print(f"credential {credential_id} revoked")


# -- domains ---------------------------------------------------------------------------------


@domain_cmd.command("add")
def domain_add(
    domain: str,
    app_name: Annotated[str, typer.Option("--app", help="The app that sends from it.")],
    as_json: JsonFlag = False,
) -> None:
    """Register a sending domain; prints the DNS records to publish."""
    settings = get_settings()
    try:
        row = tenancy.add_domain(_store(), app_name, domain)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    records = tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain)
    if as_json:
        _print_json({"domain": row["name"], "app": app_name, "records": records})
    else:
        out.print(f"domain [bold]{row['name']}[/bold] added; publish these records:")
        _print_table(records, ["purpose", "type", "name", "value"])


@domain_cmd.command("list")
def domain_list(as_json: JsonFlag = False) -> None:
    """List sending domains."""
    from sqlalchemy import select

    from postbode.store.schema import apps, domains

    with _store().read() as conn:
        rows = [
            dict(r)
            for r in conn.execute(
                select(
                    domains.c.name,
                    apps.c.name.label("app"),
                    domains.c.dkim_selector,
                    domains.c.verified_at,
                )
                .join(apps, apps.c.id == domains.c.app_id)
                .order_by(domains.c.name)
            ).mappings()
        ]
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows, ["name", "app", "dkim_selector", "verified_at"])


# -- users -----------------------------------------------------------------------------------


@user_cmd.command("create")
def user_create(
    email: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an owner.")] = False,
    role: Annotated[str, typer.Option(help="owner, admin or viewer.")] = "viewer",
) -> None:
    """Create a web user."""
    if not password_stdin:
        _fail("give the password on standard input with --password-stdin")
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        user_id = tenancy.create_user(_store(), email, password, role=role, admin=admin)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    out.print(f"user {email} created (id {user_id})")


def main() -> None:
    app()
