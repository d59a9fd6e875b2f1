"""The management API covers what the CLI does: every `postbode` command that manages
something has an operation in /api/openapi.json (processes and operator tools are listed
apart, each with the reason it has none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from postbode.cli import app as cli
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.web.app import create_app

# `postbode` command -> the API operation that does the same.
EQUIVALENTS: dict[str, tuple[str, str]] = {
    "app create": ("post", "/api/v1/apps"),
    "app list": ("get", "/api/v1/apps"),
    "app hold": ("post", "/api/v1/apps/{app}/hold"),
    "app release": ("post", "/api/v1/apps/{app}/release"),
    "app limits": ("patch", "/api/v1/apps/{app}/limits"),
    "credential create": ("post", "/api/v1/apps/{app}/credentials"),
    "credential list": ("get", "/api/v1/apps/{app}/credentials"),
    "credential revoke": ("delete", "/api/v1/apps/{app}/credentials/{credential_id}"),
    "domain add": ("post", "/api/v1/apps/{app}/domains"),
    "domain list": ("get", "/api/v1/domains"),
    "domain check": ("post", "/api/v1/apps/{app}/domains/{domain}/check"),
    "user create": ("post", "/api/v1/users"),
    "token create": ("post", "/api/v1/tokens"),
    "token list": ("get", "/api/v1/tokens"),
    "token revoke": ("delete", "/api/v1/tokens/{token_id}"),
    "privacy erase": ("post", "/api/v1/privacy/erasures"),
    "privacy export": ("get", "/api/v1/privacy/exports/{email}"),
    "route add": ("post", "/api/v1/routes"),
    "route list": ("get", "/api/v1/routes"),
    "route remove": ("delete", "/api/v1/routes/{route_id}"),
}

# Commands that run or look after Postbode itself rather than manage an organization.
NOT_MANAGEMENT = {
    "serve": "runs the processes",
    "web": "runs the processes",
    "smtp": "runs the processes",
    "listen": "runs the processes",
    "worker": "runs the processes",
    "migrate": "changes the database schema, before any API runs",
    "config": "prints the local process's settings",
    "demo": "demo data and a local catch-all mailbox, to try Postbode",
    "bench": "runs benchmarks on the local machine",
    "privacy purge": "runs the retention purge now, as every worker does each minute",
}


def commands(group: Any, prefix: str = "") -> Iterator[str]:
    """Every leaf command's path (typer's groups have `commands`, whichever click they use)."""
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):
            yield from commands(command, path + " ")
        else:
            yield path


def test_every_management_command_has_an_api_equivalent(
    sqlite_store: Store, tmp_path: Path
) -> None:
    root = typer.main.get_command(cli)
    found = set(commands(root))
    assert "token create" in found and "app create" in found  # the walk sees the tree
    spec = create_app(Settings(data_dir=tmp_path), sqlite_store).openapi()
    missing = []
    for command in sorted(found):
        if command in NOT_MANAGEMENT or command.split(" ")[0] in NOT_MANAGEMENT:
            continue
        if command not in EQUIVALENTS:
            missing.append(f"{command}: no API equivalent listed (add it to the API and here)")
            continue
        method, path = EQUIVALENTS[command]
        if method not in spec["paths"].get(path, {}):
            missing.append(f"{command}: {method.upper()} {path} is not in the API")
    assert missing == []
