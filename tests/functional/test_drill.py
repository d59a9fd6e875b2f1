"""The fault drill on several nodes (see postbode/testing/drill.py): two serve nodes and a
worker on a private PostgreSQL cluster; kill -9 of a node and a database restart under load."""

from __future__ import annotations

from pathlib import Path

import pytest

from postbode.testing import drill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_every_acknowledged_message_arrives_through_a_node_kill_and_a_database_restart(
    tmp_path: Path,
) -> None:
    why = drill.available()
    if why:
        pytest.skip(why)
    report = drill.run(tmp_path, messages=10_000, lease_seconds=10, log=lambda line: None)
    print("\n".join(report.lines()))  # the counts, with -s or in the failure report
    assert report.acknowledged == 10_000, report.lines()
    assert report.lost == [], f"acknowledged but never delivered: {report.lost[:20]}"
    assert report.stuck == 0, report.lines()
    assert report.killed_in_flight > 0, "the node died holding deliveries"
    assert report.unexplained_duplicates <= report.killed_in_flight, report.lines()
    assert report.passed
