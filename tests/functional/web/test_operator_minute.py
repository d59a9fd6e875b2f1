"""The operator's minute in headless Chromium, on a store seeded with a few days of four apps'
mail and a dip: from the dashboard, click the dip, land on the filtered log, open a bounced
delivery and read its reply. Each page's server time (its Server-Timing header) is printed;
benchmarks/search_scale.py --walk takes the same walk on a store of millions."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from playwright.sync_api import Page

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import create_store
from postbode.testing import scale_seed
from postbode.testing.operator_walk import walk
from postbode.web.app import create_app

from .conftest import PASSWORD, HttpServer, Watch

pytestmark = pytest.mark.xdist_group("browser")


def test_from_a_dip_on_the_dashboard_to_the_reply_of_a_bounce(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    open_page: Callable[..., tuple[Page, Watch]],
) -> None:
    monkeypatch.setattr(
        tenancy, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    store = create_store(Settings(data_dir=tmp_path))
    try:
        # Five days at the same volume every hour: enough order confirmations an hour (about
        # 45; the dip rule wants at least 20 on every day it compares with) for the hour just
        # ended, where they fell to a tenth and mostly bounced, to be a dip.
        seeded = scale_seed.seed(store, 40_000, 5, random.Random(19), flat=True)
        assert ("volume_drop", scale_seed.DIP_TAG) in seeded["alerts"]
        tenancy.create_user(store, "owner@org.test", PASSWORD, admin=True)
        http = HttpServer(create_app(Settings(data_dir=tmp_path, secret_key="walk-key"), store))
        try:
            page, watch = open_page(http.base, "owner@org.test")
            steps = walk(page, http.base, scale_seed.DIP_TAG, "blocked using zen.spamhaus.test")
        finally:
            http.stop()
    finally:
        store.dispose()
    assert [s.name for s in steps] == ["dashboard", "dip → log", "bounced message"]
    assert all(s.server_ms is not None and s.server_ms > 0 for s in steps), steps
    assert watch.errors == []
    print(f"\n{seeded['deliveries']:,} deliveries seeded; server time per page:")
    for step in steps:
        print(f"  {step.name:<16} {step.server_ms:7.1f} ms  {step.url}")
