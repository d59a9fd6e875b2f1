"""`postbode token create|list|revoke`: organisation tokens for the management API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store


def postbode(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTBODE_DATA_DIR": str(data_dir)}
    env.pop("POSTBODE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "postbode", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_token_create_prints_a_working_token_stored_hashed(tmp_path: Path) -> None:
    created = postbode(tmp_path, "token", "create", "--org", "acme", "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    assert token.startswith("pbo_")
    assert token.split("_", 2)[2].encode() not in (tmp_path / "postbode.db").read_bytes()
    store = create_store(Settings(data_dir=tmp_path))
    try:
        found = tenancy.authenticate_org_token(store, token)
        assert found is not None
        listed = json.loads(postbode(tmp_path, "token", "list", "--org", "acme", "--json").stdout)
        assert [t["id"] for t in listed] == [found.id]
        revoked = postbode(tmp_path, "token", "revoke", str(found.id), "--org", "acme")
        assert revoked.returncode == 0, revoked.stderr
        assert tenancy.authenticate_org_token(store, token) is None
        assert postbode(tmp_path, "token", "list", "--org", "nobody").returncode == 2
    finally:
        store.dispose()
