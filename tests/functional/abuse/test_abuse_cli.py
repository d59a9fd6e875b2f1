"""`postbode app hold` and `postbode app release` as an operator uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.store.schema import audit_log


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


def test_hold_and_release_from_the_command_line(tmp_path: Path) -> None:
    assert postbode(tmp_path, "app", "create", "shop", "--json").returncode == 0
    no_reason = postbode(tmp_path, "app", "hold", "shop")
    assert no_reason.returncode != 0 and "--reason" in no_reason.stderr
    assert postbode(tmp_path, "app", "hold", "nope", "--reason", "x").returncode == 2
    held = postbode(tmp_path, "app", "hold", "shop", "--reason", "leaked key", "--json")
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout) == {"app": "shop", "held": True, "changed": True}
    listed = json.loads(postbode(tmp_path, "app", "list", "--json").stdout)
    assert listed[0]["hold_reason"] == "leaked key"
    released = postbode(tmp_path, "app", "release", "shop", "--json")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout) == {"app": "shop", "held": False, "released": 0}
    store = create_store(Settings(data_dir=tmp_path))
    try:
        with store.read() as conn:
            rows = conn.execute(select(audit_log.c.actor, audit_log.c.action)).all()
    finally:
        store.dispose()
    assert [tuple(r) for r in rows] == [("cli", "app.hold"), ("cli", "app.release")]
