"""The leaked-key drill (postbode/testing/spike_drill.py) on a real `postbode serve`, on SQLite
and PostgreSQL: a week of ordinary history, then 3,000 messages in under a minute through one
API key and one SMTP login."""

from __future__ import annotations

from pathlib import Path

import pytest

from postbode.config import Settings
from postbode.store.engine import Store
from postbode.testing import spike_drill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_a_leaked_key_is_held_within_300_messages_and_released_by_an_owner(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    url = settings.database_url if store.engine.dialect.name == "postgresql" else None
    report = spike_drill.run(tmp_path, url, messages_in_burst=3000, log=lambda line: None)
    print("\n".join(report.lines()))  # the figures, with -s or in the failure report
    assert report.acknowledged == 3000, report.lines()
    assert report.accepted_before_hold <= 300, report.lines()
    assert report.sent_before_release <= report.accepted_before_hold, report.lines()
    assert report.alert_after_seconds is not None and report.alert_after_seconds <= 60
    assert report.held_after_restart == report.held_before_release > 2500, report.lines()
    assert report.missing == 0, report.lines()
    assert spike_drill.OWNER in report.released_by
    assert report.passed
