"""The `postbode` command as a newcomer uses it, in a fresh data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from postbode.testing.process import PostbodeProcess


def postbode(
    data_dir: Path, *args: str, stdin: str = "", columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTBODE_DATA_DIR": str(data_dir)}
    if columns is not None:  # a terminal this wide
        env["COLUMNS"] = str(columns)
    env.pop("POSTBODE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_app_create_prints_the_contract_and_the_key_works(tmp_path: Path) -> None:
    result = postbode(tmp_path, "app", "create", "shop", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"app", "api_key", "smtp_username", "smtp_password"}
    assert created["app"] == "shop"
    # the store was created and migrated on first use; the key is stored only as a hash
    db = (tmp_path / "postbode.db").read_bytes()
    assert created["api_key"].encode() not in db
    assert created["api_key"].split("_", 2)[2].encode() not in db
    assert created["smtp_password"].encode() not in db

    from postbode import tenancy
    from postbode.config import Settings
    from postbode.store.engine import create_store

    store = create_store(Settings(data_dir=tmp_path))
    try:
        assert tenancy.authenticate_api_key(store, created["api_key"]) is not None
    finally:
        store.dispose()

    listed = postbode(tmp_path, "app", "list", "--json")
    assert [a["name"] for a in json.loads(listed.stdout)] == ["shop"]


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    assert postbode(tmp_path, "app", "create", "shop").returncode == 0
    again = postbode(tmp_path, "app", "create", "shop", "--json")
    assert again.returncode != 0 and "already exists" in again.stderr
    bad = postbode(tmp_path, "domain", "add", "not a domain", "--app", "shop")
    assert bad.returncode != 0 and "invalid domain" in bad.stderr
    no_app = postbode(tmp_path, "domain", "add", "shop.test", "--app", "nope")
    assert no_app.returncode != 0 and "no app named 'nope'" in no_app.stderr
    no_stdin = postbode(tmp_path, "user", "create", "a@shop.test")
    assert no_stdin.returncode != 0 and "--password-stdin" in no_stdin.stderr
    unknown = postbode(tmp_path, "frobnicate")
    assert unknown.returncode != 0


def test_domain_add_prints_records_and_user_create(tmp_path: Path) -> None:
    postbode(tmp_path, "app", "create", "shop")
    result = postbode(tmp_path, "domain", "add", "shop.test", "--app", "shop", "--json")
    assert result.returncode == 0, result.stderr
    records = {r["purpose"] for r in json.loads(result.stdout)["records"]}
    assert records == {"spf", "dkim", "return_path", "return_path_mx", "dmarc"}
    user = postbode(
        tmp_path,
        "user",
        "create",
        "me@shop.test",
        "--password-stdin",
        "--admin",
        stdin="a long password\n",
    )
    assert user.returncode == 0, user.stderr


def test_config_masks_secrets_and_docs_are_generated(tmp_path: Path) -> None:
    env_secret = "s3cr3t-value"
    result = subprocess.run(
        [sys.executable, "-m", "postbode", "config", "--json"],
        env={**os.environ, "POSTBODE_SECRET_KEY": env_secret, "POSTBODE_SMTP_PORT": "2600"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    values = json.loads(result.stdout)
    assert values["POSTBODE_SMTP_PORT"] == 2600
    assert values["POSTBODE_HTTP_PORT"] == 8025
    assert env_secret not in result.stdout
    generated = postbode(tmp_path, "config", "--markdown").stdout
    committed = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert generated == committed, "docs/configuration.md is stale: run `make docs`"


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "postbode.toml"
    config.write_text("smtp_port = 2700\nhttp_port = 9000\n")
    result = subprocess.run(
        [sys.executable, "-m", "postbode", "config", "--json"],
        env={**os.environ, "POSTBODE_CONFIG": str(config), "POSTBODE_HTTP_PORT": "9100"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    values = json.loads(result.stdout)
    assert values["POSTBODE_SMTP_PORT"] == 2700
    assert values["POSTBODE_HTTP_PORT"] == 9100


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_serve_answers_healthz_and_metrics_and_stops_on_sigterm(
    tmp_path: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    env = {}
    if dialect == "postgresql":
        env["POSTBODE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    server = PostbodeProcess(tmp_path, env)
    server.start()
    try:
        health = httpx.get(f"{server.http_url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        metrics = httpx.get(f"{server.http_url}/metrics")
        assert metrics.status_code == 200
        assert "postbode_accepted_messages_total" in metrics.text
    finally:
        assert server.stop() == 0, server.log()


def test_worker_list_names_every_queue_runner_and_periodic_task(tmp_path: Path) -> None:
    result = postbode(tmp_path, "worker", "--list", "--json")
    assert result.returncode == 0, result.stderr
    listed = {(e["kind"], e["name"]): e for e in json.loads(result.stdout)}
    assert {("queue", "deliveries"), ("queue", "webhook_requests")} <= set(listed)
    assert {
        ("task", "sweep.deliveries"),
        ("task", "sweep.webhook_requests"),
        ("task", "stats.compact"),
        ("task", "domains.dns_check"),
        ("task", "privacy.retention"),
        ("task", "stats.anomalies"),
        ("task", "stats.reports"),
    } <= set(listed)
    assert all(e["does"] for e in listed.values())
    table = postbode(tmp_path, "worker", "--list")
    assert table.returncode == 0 and "sweep.deliveries" in table.stdout


def test_version(tmp_path: Path) -> None:
    from postbode import __version__

    result = postbode(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"postbode {__version__}"


def test_domain_records_in_full_and_again_later(tmp_path: Path) -> None:
    assert postbode(tmp_path, "app", "create", "shop").returncode == 0
    added = postbode(tmp_path, "domain", "add", "shop.test", "--app", "shop", columns=80)
    assert added.returncode == 0, added.stderr
    from postbode.config import Settings
    from postbode.store.engine import create_store
    from postbode.store.schema import domains

    store = create_store(Settings(data_dir=tmp_path))
    try:
        with store.read() as conn:
            row = conn.execute(domains.select()).one()
    finally:
        store.dispose()
    # The DKIM key whole, on one line, never cut at the terminal's width.
    assert any(line.strip() == row.dkim_public_key for line in added.stdout.splitlines())
    assert f"{row.dkim_selector}._domainkey.shop.test" in added.stdout
    assert "…" not in added.stdout

    again = postbode(tmp_path, "domain", "list", "--records")
    assert again.returncode == 0, again.stderr
    assert any(line.strip() == row.dkim_public_key for line in again.stdout.splitlines())
    listed = json.loads(postbode(tmp_path, "domain", "list", "--records", "--json").stdout)
    dkim = [r for r in listed[0]["records"] if r["purpose"] == "dkim"]
    assert dkim[0]["value"] == row.dkim_public_key
    missing = postbode(tmp_path, "domain", "list", "--records", "other.test")
    assert missing.returncode == 2 and "no such domain" in missing.stderr


def test_a_malformed_domain_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert postbode(tmp_path, "app", "create", "shop").returncode == 0
    for name, why in (
        ("shop..test", "empty label"),
        (".shop.test", "empty label"),
        ("shop", "at least two labels"),
        ("shop-.test", "hyphen"),
        ("x" * 64 + ".test", "longer than 63"),
    ):
        bad = postbode(tmp_path, "domain", "add", name, "--app", "shop")
        assert bad.returncode == 2, (name, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert why in bad.stderr and "codec" not in bad.stderr and "Traceback" not in bad.stderr


def test_serve_says_where_the_ui_is_and_how_to_get_in(tmp_path: Path) -> None:
    server = PostbodeProcess(tmp_path, {"POSTBODE_LOG_LEVEL": "info"})
    server.start()
    try:
        setup = f"{server.http_url}/setup"
        log = server.wait_log(setup)
        assert f"no user yet: open {setup} to create the owner account" in log
        assert httpx.get(setup).status_code == 200
    finally:
        assert server.stop() == 0, server.log()
    created = postbode(
        tmp_path,
        "user",
        "create",
        "me@shop.test",
        "--password-stdin",
        "--admin",
        stdin="a long password\n",
    )
    assert created.returncode == 0, created.stderr
    again = PostbodeProcess(tmp_path, {"POSTBODE_LOG_LEVEL": "info"})
    again.start()
    try:
        login = f"{again.http_url}/login"
        assert f"sign in at {login}" in again.wait_log(login)
    finally:
        assert again.stop() == 0, again.log()
