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


def postbode(data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTBODE_DATA_DIR": str(data_dir)}
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
    assert records == {"spf", "dkim", "return_path", "dmarc"}
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
    } <= set(listed)
    assert all(e["does"] for e in listed.values())
    table = postbode(tmp_path, "worker", "--list")
    assert table.returncode == 0 and "sweep.deliveries" in table.stdout


def test_version(tmp_path: Path) -> None:
    from postbode import __version__

    result = postbode(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"postbode {__version__}"
