"""The `postbode` command: run the roles, migrate, and manage apps, credentials, domains, users."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from postbode import __version__, tenancy
from postbode.config import Settings, describe, get_settings
from postbode.store.engine import Store, create_store

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Postbode: transactional mail.")
app_cmd = typer.Typer(no_args_is_help=True, help="Apps: one application's mail each.")
credential_cmd = typer.Typer(no_args_is_help=True, help="API keys and SMTP logins of an app.")
domain_cmd = typer.Typer(no_args_is_help=True, help="Sending domains and their DNS records.")
user_cmd = typer.Typer(no_args_is_help=True, help="People who use the web interface.")
token_cmd = typer.Typer(
    no_args_is_help=True, help="Organisation tokens for the management API (/api/v1/apps …)."
)
app.add_typer(app_cmd, name="app")
app.add_typer(credential_cmd, name="credential")
app.add_typer(domain_cmd, name="domain")
app.add_typer(user_cmd, name="user")
app.add_typer(token_cmd, name="token")

err = Console(stderr=True)
out = Console()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"postbode {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Postbode: transactional mail."""
    from postbode.preflight import BadSetting, check, read

    try:
        check(settings := read())  # every setting, before any command does anything
    except BadSetting as exc:
        _fail(str(exc))
    running = ctx.invoked_subcommand in ("serve", "web", "smtp", "listen", "worker")
    if running and "--help" not in sys.argv[1:]:
        from postbode.metrics_dir import use_node_directory

        # Before the metrics are loaded; `serve` starts the node's processes afresh.
        use_node_directory(settings.data_dir, fresh=ctx.invoked_subcommand == "serve")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)  # one line, however long
    raise typer.Exit(2)


InitFlag = Annotated[
    bool,
    typer.Option(
        "--init",
        help="Start a new installation even though an empty or missing database file lies "
        "beside an earlier one's files (a new secret key: links already sent stop working).",
    ),
]


def _store(init: bool = False, migrate: bool | None = None) -> Store:
    from postbode.store.engine import LostStore, SchemaMismatch

    try:
        return create_store(get_settings(), init=init, migrate=migrate)
    except SchemaMismatch as exc:
        _fail(str(exc))
    except LostStore as exc:
        _fail(
            f"{exc}: refusing to start a new installation over it (a new secret key would "
            "break every tracking and unsubscribe link already sent); restore the database, "
            "or pass --init to start afresh"
        )
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


def _run(roles: list[str], init: bool = False) -> None:
    from postbode.roles import configure_logging, start

    configure_logging(get_settings())
    if get_settings().sqlalchemy_url.startswith("sqlite"):
        _migrate_apart(init)
    start(get_settings(), _store(init), roles)


def _migrate_apart(init: bool) -> None:
    """Open (and migrate, if behind) the SQLite store in a forked child process, so that
    alembic and the migration scripts (about 9 MiB) never stay in a long-running process's
    memory: the parent then finds the schema at its revision."""
    import os

    pid = os.fork()
    if pid == 0:  # the child: no threads, no store opened yet in the parent
        code = 1
        try:
            _store(init).dispose()
            code = 0
        except typer.Exit as exc:  # _fail said why
            code = exc.exit_code
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise typer.Exit(code)


# -- processes -------------------------------------------------------------------------------


@app.command()
def serve(init: InitFlag = False) -> None:
    """Run every role in one command: HTTP API and UI, SMTP listener, delivery workers."""
    from postbode.roles import serve_roles

    _run(serve_roles(get_settings()), init)


@app.command()
def web(init: InitFlag = False) -> None:
    """Run the HTTP API and web UI."""
    _run(["web"], init)


@app.command()
def smtp(init: InitFlag = False) -> None:
    """Run the SMTP listener (submission, bounces, inbound)."""
    _require_role("smtp")
    _run(["smtp"], init)


@app.command()
def listen(init: InitFlag = False) -> None:
    """Run the HTTP API and UI and the SMTP listener in one process (as `serve` does, without
    its worker processes)."""
    _run(["web", "smtp"], init)


@app.command()
def worker(
    list_: Annotated[
        bool, typer.Option("--list", help="Print the queue runners and periodic tasks, and exit.")
    ] = False,
    as_json: JsonFlag = False,
    init: InitFlag = False,
) -> None:
    """Run the queue runners (deliveries, webhooks …) and the periodic tasks."""
    if list_:
        from postbode.work import registry

        entries = registry(get_settings()).describe()
        if as_json:
            _print_json(entries)
        else:
            _print_table(entries, ["kind", "name", "every", "does"])
        return
    _require_role("worker")
    _run(["worker"], init)


def _require_role(name: str) -> None:
    from postbode.roles import available_roles

    if name not in available_roles():
        _fail(f"the {name!r} role is not part of this build yet")


@app.command()
def migrate(init: InitFlag = False) -> None:
    """Apply database migrations: on PostgreSQL once per upgrade, before the new release's
    processes start (they refuse a database at another revision); SQLite is also migrated on
    first use by any command."""
    from postbode.store.migrate import current_revision

    store = _store(init, migrate=True)
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
    organization: Annotated[
        str, typer.Option("--organization", "--org", help="Organization to create it in.")
    ] = tenancy.DEFAULT_ORGANIZATION,
) -> None:
    """Create an app with an API key and an SMTP login (shown once). App names are unique
    within an organization; other organizations may have apps of the same name."""
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
        _print_table(
            rows, ["name", "organization", "status", "hold_reason", "domains", "credentials"]
        )


# Where an app name needs its organisation: when several organisations have an app of it.
AppOrgOption = Annotated[
    str | None,
    typer.Option(
        "--org",
        help="The app's organization (needed only when several have an app of this name).",
    ),
]


def _app_id(name: str, organization: str | None) -> tuple[Store, int]:
    store = _store()
    try:
        with store.read() as conn:
            return store, int(tenancy.app_by_name(conn, name, organization)["id"])
    except tenancy.TenancyError as exc:
        _fail(str(exc))


@app_cmd.command("hold")
def app_hold(
    name: str,
    reason: Annotated[str, typer.Option(help="Why: shown with every held delivery.")],
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """Hold the app's mail: new mail is accepted as held, queued mail waits, until released."""
    from postbode.abuse import hold

    store, app_id = _app_id(name, organization)
    try:
        changed = hold.hold(store, app_id, reason, hold.Actor("cli"))
    except hold.HoldError as exc:
        _fail(str(exc))
    if as_json:
        _print_json({"app": name, "held": True, "changed": changed})
    elif changed:
        out.print(f"app [bold]{name}[/bold] is held: {reason}")
    else:
        out.print(f"app [bold]{name}[/bold] was already held")


LimitOption = Annotated[int | None, typer.Option(min=0, help="Messages; 0 removes the limit.")]


@app_cmd.command("limits")
def app_limits(
    name: str,
    per_minute: LimitOption = None,
    per_hour: LimitOption = None,
    per_day: LimitOption = None,
    credential: Annotated[
        int | None, typer.Option(help="A credential's id (`credential list`): its own limits.")
    ] = None,
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """Show or set the app's (or one credential's) sending limits: over one, SMTP answers
    451 4.7.1 and the API 429 with Retry-After."""
    from postbode import audit
    from postbode.abuse import limits

    store, app_id = _app_id(name, organization)
    changes = {
        k: v
        for k, v in (("per_minute", per_minute), ("per_hour", per_hour), ("per_day", per_day))
        if v is not None
    }
    try:
        with store.write() as conn:
            after = limits.set_limits(conn, app_id, changes, credential)
            if changes:
                target = name if credential is None else f"{name} credential {credential}"
                org = tenancy.app_by_name(conn, name, organization)["organization_id"]
                audit.write(conn, org, "cli", "app.limits", target, after.as_json())
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    shown = {"app": name, "credential": credential, **after.as_json()}
    if as_json:
        _print_json(shown)
    else:
        for key, value in after.as_json().items():
            out.print(f"{key}: {'no limit' if value is None else value}")


@app_cmd.command("release")
def app_release(name: str, as_json: JsonFlag = False, organization: AppOrgOption = None) -> None:
    """End the app's hold and send its held mail."""
    from postbode.abuse import hold, release

    store, app_id = _app_id(name, organization)
    released = release.release(store, app_id, hold.Actor("cli"))
    if as_json:
        _print_json({"app": name, "held": False, "released": released})
    else:
        out.print(f"app [bold]{name}[/bold] released; {released} held deliveries queued")


@credential_cmd.command("create")
def credential_create(
    app_name: Annotated[str, typer.Option("--app", help="The app's name.")],
    kind: Annotated[str, typer.Option(help="api or smtp.")] = "api",
    name: Annotated[str, typer.Option(help="A label, e.g. where it is used.")] = "",
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """Create an API key or SMTP login (the secret is shown once)."""
    try:
        created = tenancy.create_credential(
            _store(), app_name, kind, name, organization=organization
        )
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
    organization: AppOrgOption = None,
) -> None:
    """List an app's credentials (never their secrets)."""
    try:
        rows = tenancy.list_credentials(_store(), app_name, organization=organization)
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
    inbound: Annotated[
        bool, typer.Option("--inbound", help="It also takes mail for the app's routes.")
    ] = False,
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """Register a sending domain (with --inbound: one that takes mail for the app's routes,
    too); prints the DNS records to publish. Another organization may claim the same name:
    the claim whose own DKIM record is found in DNS holds it (`postbode domain check`)."""
    settings = get_settings()
    try:
        row = tenancy.add_domain(
            _store(), app_name, domain, inbound=inbound, organization=organization
        )
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    records = tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain)
    if row["inbound"]:
        records = tenancy.inbound_records(row, settings.smtp_hostname) + records
    if as_json:
        _print_json({"domain": row["name"], "app": app_name, "records": records})
    else:
        out.print(f"domain [bold]{row['name']}[/bold] added; publish these records:")
        _print_records(records)
        out.print(f"(again at any time: postbode domain list --records {row['name']})")


def _print_records(records: list[dict[str, str]]) -> None:
    """DNS records in full, each value on a line of its own, never cut or wrapped to the
    terminal's width (a DKIM key is copied from here into a zone)."""
    for r in records:
        sys.stdout.write(f"\n{r['purpose']}: {r['type']} record at {r['name']}\n")
        sys.stdout.write(f"  {r['value']}\n")
    sys.stdout.flush()


def _key_columns() -> tuple[Any, ...]:
    from postbode.store.schema import domains

    c = domains.c
    return (
        c.dkim_public_key,
        c.previous_dkim_selector,
        c.previous_dkim_public_key,
        c.previous_dkim_until,
    )


@domain_cmd.command("list")
def domain_list(
    names: Annotated[
        list[str] | None, typer.Argument(help="Only these domains (default: every one).")
    ] = None,
    records: Annotated[
        bool, typer.Option("--records", help="Print each domain's DNS records to publish, too.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """List sending domains; with --records, the DNS records each needs, in full."""
    from sqlalchemy import select

    from postbode.store.schema import apps, domains, organizations

    settings = get_settings()
    key_columns = _key_columns()
    query = (
        select(
            domains.c.name,
            apps.c.name.label("app"),
            organizations.c.name.label("organization"),
            domains.c.dkim_selector,
            domains.c.verified_at,
            domains.c.inbound,
            *key_columns,
        )
        .join(apps, apps.c.id == domains.c.app_id)
        .join(organizations, organizations.c.id == apps.c.organization_id)
        .order_by(domains.c.name, domains.c.verified_at.is_(None), domains.c.id)
    )
    if names:
        query = query.where(domains.c.name.in_([n.strip().lower().rstrip(".") for n in names]))
    with _store().read() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    if names and not rows:
        _fail(f"no such domain: {', '.join(names)}")
    for row in rows:
        found = tenancy.dns_records(row, settings.smtp_hostname, settings.return_path_domain)
        if row["inbound"]:
            found = tenancy.inbound_records(row, settings.smtp_hostname) + found
        row["records"] = found
        for column in key_columns:
            del row[column.name]
    if as_json:
        _print_json(
            rows if records else [{k: v for k, v in r.items() if k != "records"} for r in rows]
        )
    elif records:
        for row in rows:
            out.print(f"\n[bold]{row['name']}[/bold] (app {row['app']}, {row['organization']}):")
            _print_records(row["records"])
    else:
        _print_table(
            rows, ["name", "app", "organization", "dkim_selector", "verified_at", "inbound"]
        )


# -- inbound routes --------------------------------------------------------------------------

route_cmd = typer.Typer(no_args_is_help=True, help="Inbound routes: mail for an app's addresses.")
app.add_typer(route_cmd, name="route")


@route_cmd.command("add")
def route_add(
    app_name: Annotated[str, typer.Option("--app", help="The app that takes the mail.")],
    match: Annotated[
        str,
        typer.Option(
            "--match",
            help="local@domain (also takes local+hash@domain) or *@domain, at one of the "
            "app's inbound domains.",
        ),
    ],
    url: Annotated[str | None, typer.Option("--url", help="Where the mail is POSTed.")] = None,
    action: Annotated[str, typer.Option(help="post, hold or reject.")] = "post",
    format: Annotated[str, typer.Option("--format", help="native or postmark.")] = "native",
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """Add a route; prints it with its signing secret (shown once)."""
    from postbode.endpoints.destinations import DestinationPolicy
    from postbode.inbound import routes

    store = _store()
    policy = DestinationPolicy.from_settings(get_settings())
    try:
        app_id = routes.app_id_by_name(store, app_name, organization)
        created = routes.create_route(
            store, app_id, match, url=url, action=action, format=format, policy=policy
        )
    except routes.RouteError as exc:
        _fail(exc.message)
    if as_json:
        _print_json({"app": app_name, **created})
    else:
        out.print(f"route [bold]{created['match']}[/bold] added ({created['action']})")
        out.print(f"  signing secret (shown once): {created['secret']}")


@route_cmd.command("list")
def route_list(
    app_name: Annotated[str, typer.Option("--app", help="The app's name.")],
    as_json: JsonFlag = False,
    organization: AppOrgOption = None,
) -> None:
    """List an app's routes."""
    from postbode.inbound import routes

    store = _store()
    try:
        rows = routes.list_routes(store, routes.app_id_by_name(store, app_name, organization))
    except routes.RouteError as exc:
        _fail(exc.message)
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows, ["id", "match", "action", "url", "format", "enabled"])


@route_cmd.command("remove")
def route_remove(
    app_name: Annotated[str, typer.Option("--app", help="The app's name.")],
    match: Annotated[str, typer.Option("--match", help="The route's pattern.")],
    organization: AppOrgOption = None,
) -> None:
    """Remove a route; mail for its addresses is refused from then on."""
    from postbode.inbound import routes

    store = _store()
    try:
        app_id = routes.app_id_by_name(store, app_name, organization)
        routes.delete_route(store, app_id, routes.route_id_by_pattern(store, app_id, match))
    except routes.RouteError as exc:
        _fail(exc.message)
    out.print(f"route {match} removed")


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


# -- organisation tokens ---------------------------------------------------------------------


OrgOption = Annotated[str, typer.Option("--org", help="The organization.")]


@token_cmd.command("create")
def token_create(
    organization: OrgOption = tenancy.DEFAULT_ORGANIZATION,
    name: Annotated[str, typer.Option(help="A label, e.g. where it is used.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Make a management API token for an organization (shown once; stored hashed)."""
    try:
        created = tenancy.create_org_token(_store(), organization, name)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        _print_json({"token": created["token"], "id": created["id"], "organization": organization})
    else:
        out.print(f"token {created['id']} for [bold]{organization}[/bold]; shown only once:")
        out.print(f"  {created['token']}")


@token_cmd.command("list")
def token_list(
    organization: OrgOption = tenancy.DEFAULT_ORGANIZATION, as_json: JsonFlag = False
) -> None:
    """List an organization's tokens (never the tokens themselves)."""
    store = _store()
    try:
        rows = tenancy.list_org_tokens(store, tenancy.organization_id(store, organization))
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(rows)
    else:
        _print_table(rows, ["id", "name", "lookup", "created_at", "revoked_at"])


@token_cmd.command("revoke")
def token_revoke(token_id: int, organization: OrgOption = tenancy.DEFAULT_ORGANIZATION) -> None:
    """Revoke a token; it stops working with the next request."""
    store = _store()
    try:
        tenancy.revoke_org_token(store, tenancy.organization_id(store, organization), token_id)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    out.print(f"token {token_id} revoked")


# -- DNS checks and demo data --------------------------------------------------------------


@domain_cmd.command("check")
def domain_check(
    domain: str,
    as_json: JsonFlag = False,
    app_name: Annotated[
        str | None,
        typer.Option("--app", help="The app whose claim to check (needed when several claim it)."),
    ] = None,
    organization: AppOrgOption = None,
) -> None:
    """Look up a domain's DNS records now and store the verdicts (exit status 1 unless every
    record passes, so a script can wait for DNS). A claim whose records pass is not verified
    while another app's claim of the name is: this says which."""
    from postbode import dnscheck

    store = _store()
    try:
        app_id = None
        if app_name is not None:
            with store.read() as conn:
                app_id = int(tenancy.app_by_name(conn, app_name, organization)["id"])
        result = asyncio.run(dnscheck.check_domain(store, get_settings(), domain, app_id=app_id))
        with store.read() as conn:
            holder = tenancy.verified_elsewhere(conn, result.domain, result.app_id)
    except tenancy.TenancyError as exc:
        _fail(str(exc))
    if as_json:
        shown = result.as_json()
        if holder is not None:  # the operator's view: the other claim is named
            shown["verified_claim"] = {k: holder[k] for k in ("app", "organization")}
        _print_json(shown)
    else:
        state = "verified" if result.verified else "not verified"
        out.print(f"domain [bold]{result.domain}[/bold]: {state}")
        if holder is not None:
            out.print(
                f"[yellow]the verified claim is app {holder['app']!r} of organization "
                f"{holder['organization']!r}: this claim cannot be verified while it is[/]"
            )
        colours = {"pass": "green", "missing": "yellow", "wrong": "red"}
        table = Table("record", "status", "name", "detail")
        for c in result.records:
            table.add_row(
                c.purpose, f"[{colours[c.status]}]{c.status}[/]", f"{c.type} {c.name}", c.detail
            )
        out.print(table)
    if not result.all_pass:
        raise typer.Exit(1)


demo_cmd = typer.Typer(
    no_args_is_help=True, help="Demo data and a demo mailbox, to try Postbode on one machine."
)
app.add_typer(demo_cmd, name="demo")


@demo_cmd.command("seed")
def demo_seed(
    messages: Annotated[
        int, typer.Option("--messages", min=1, help="How many messages to make.")
    ] = 10_000,
    app_name: Annotated[
        str, typer.Option("--app", help="The app to fill (created with a domain if missing).")
    ] = "demo",
    days: Annotated[
        float, typer.Option(min=0.01, max=400, help="Spread the mail over this many days.")
    ] = 30,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed, for the same data every time.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fill an app with realistic traffic: tagged flows with a daily rhythm, deferrals,
    bounces, suppressions, opens and clicks, with their events and statistics."""
    import random

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from postbode import demo

    store = _store()
    columns = (
        TextColumn("[bold]seeding[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=as_json) as bar:
        task = bar.add_task(app_name, total=messages, rate="")

        def advance(count: int) -> None:
            bar.advance(task, count)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} msg/s" if speed else "")

        try:
            report = demo.seed(
                store,
                messages=messages,
                app=app_name,
                days=days,
                rng=random.Random(seed),
                progress=advance,
            )
        except tenancy.TenancyError as exc:
            _fail(str(exc))
    if as_json:
        _print_json(report.as_json())
    else:
        out.print(
            f"app [bold]{report.app}[/bold] ({report.domain}): {report.messages:,} messages, "
            f"{report.deliveries:,} deliveries, {report.events:,} events, "
            f"{report.attempts:,} attempts in {report.seconds:.1f} s"
        )
        by_status = ", ".join(f"{k} {v:,}" for k, v in report.statuses.items())
        out.print(f"deliveries by status: {by_status}")


@demo_cmd.command("sink")
def demo_sink(
    smtp: Annotated[
        str, typer.Option(help="Where it takes mail (route domains here with the transport map).")
    ] = "127.0.0.1:2626",
    http: Annotated[str, typer.Option(help="Where its page lists what arrived.")] = (
        "127.0.0.1:8026"
    ),
) -> None:
    """A local catch-all mailbox: takes every message for every address and lists it on a
    page, so a first delivery succeeds without DNS or the internet. Start Postbode with
    POSTBODE_TRANSPORT_MAP='*=127.0.0.1:2626' to send all mail here."""
    from postbode import demo_sink as sink

    try:
        smtp_host, smtp_port = _host_port(smtp)
        http_host, http_port = _host_port(http)
    except ValueError as exc:
        _fail(str(exc))
    out.print(f"demo sink: SMTP on {smtp}, messages at http://{http}/ (Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(sink.run(smtp_host, smtp_port, http_host, http_port))


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


# -- privacy -----------------------------------------------------------------------------------

privacy_cmd = typer.Typer(
    no_args_is_help=True, help="Per-person erasure and export, and the retention purge."
)
app.add_typer(privacy_cmd, name="privacy")
OneOrgOption = Annotated[
    str | None,
    typer.Option("--org", help="The organization (needed when there is more than one)."),
]


@privacy_cmd.command("erase")
def privacy_erase(
    email: str,
    organization: OneOrgOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be erased; change nothing.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Erase everything held about EMAIL in every app of the organization (suppressions are
    kept as a keyed hash, so a suppressed address stays suppressed). Exit status 3 when
    deliveries to it were being sent: run it again a minute later."""
    from postbode.privacy import erasure

    store = _store()
    try:
        scope = erasure.resolve_scope(store, organization)
        result = erasure.erase(store, email, scope, dry_run=dry_run)
    except erasure.ErasureError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(result.as_json())
    else:
        verb = "would erase" if dry_run else "erased"
        out.print(f"{verb} in {scope.organization} ({', '.join(result.apps) or 'no apps'}):")
        _print_table([{"kind": k, "rows": v} for k, v in result.counts.items()], ["kind", "rows"])
        out.print(f"recorded in the audit log as {result.address_hash}")
    if result.in_flight:
        err.print(f"{result.in_flight} deliveries were being sent: run this again in a minute")
        raise typer.Exit(3)


@privacy_cmd.command("export")
def privacy_export(
    email: str,
    organization: OneOrgOption = None,
    no_bodies: Annotated[
        bool, typer.Option("--no-bodies", help="Leave out the messages' stored sources.")
    ] = False,
) -> None:
    """Print everything held about EMAIL in the organization's apps as one JSON document."""
    from postbode.privacy import erasure, export

    store = _store()
    try:
        scope = erasure.resolve_scope(store, organization)
        doc = export.export(store, email, scope, bodies=not no_bodies)
    except erasure.ErasureError as exc:
        _fail(str(exc))
    _print_json(doc)


@privacy_cmd.command("purge")
def privacy_purge(as_json: JsonFlag = False) -> None:
    """Run the retention purge once now (workers run it every minute)."""
    from postbode.privacy.retention import purge

    report = purge(_store(), budget=float("inf"))
    if as_json:
        _print_json(report.as_json())
    else:
        _print_table(
            [{"kind": k, "rows": v} for k, v in report.as_json().items() if k != "complete"],
            ["kind", "rows"],
        )


def main() -> None:
    app()
