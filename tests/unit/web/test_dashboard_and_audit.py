"""The dashboard's numbers and live fragment, the audit log page, and the vendored files."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from postbode import tenancy
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import utcnow
from postbode.testing.factories import make_queued_message
from postbode.web.ui import STATIC
from postbode.web.ui.core import templates

from .conftest import Browser, Org


def traffic(store: Store, app_id: int) -> None:
    now = utcnow() - timedelta(minutes=5)
    events = []
    for i in range(10):
        common = {"app_id": app_id, "tag": "welcome" if i < 6 else "<b>reset</b>", "at": now}
        events.append(Event(type=EventType.MESSAGE_RECEIVED, **common))  # type: ignore[arg-type]
        events.append(Event(type=EventType.DELIVERY_QUEUED, **common))  # type: ignore[arg-type]
        if i < 8:
            events.append(Event(type=EventType.DELIVERY_DELIVERED, **common))  # type: ignore[arg-type]
        else:
            events.append(
                Event(
                    type=EventType.DELIVERY_BOUNCED,
                    data={"category": "user_unknown", "hard": True},
                    **common,
                )
            )  # type: ignore[arg-type]
    events.append(Event(type=EventType.MESSAGE_OPENED, app_id=app_id, at=now, tag="welcome"))
    events.append(
        Event(type=EventType.MESSAGE_OPENED, app_id=app_id, at=now, tag="welcome", bot=True)
    )
    with store.write() as conn:
        record(conn, events)


def test_the_dashboard_shows_the_counters(ui: tuple[Store, Org, Callable], viewer: Browser) -> None:
    store, org, _ = ui
    traffic(store, org.shop.app_id)
    make_queued_message(store, org.shop.app_id, ["a@dest.test", "b@dest.test"])
    page = viewer.get("/dashboard?range=1h").text
    data = json.loads(re.search(r'id="chart-data">(.*?)</script>', page).group(1))  # type: ignore[union-attr]
    lines = {line["key"]: sum(line["data"]) for line in data["lines"]}
    assert lines == {
        "received": 10,
        "delivered": 8,
        "deferred": 0,
        "bounced": 2,
        "opened": 2,
        "clicked": 0,
    }
    assert len(data["labels"]) == 60 and data["bucket_seconds"] == 60
    kpi = dict(re.findall(r'data-kpi="(\w+)">([^<]*)<', page))
    assert kpi["received"] == "10" and kpi["delivery_rate"] == "80.0\u202f%"
    assert kpi["bounce_rate"] == "20.0\u202f%" and kpi["queue"] == "2"
    assert kpi["open_rate"] == "12.5\u202f%"  # one person of eight delivered; the bot apart
    assert "1 human · 1 bot" in page
    assert "user_unknown" in page and "welcome" in page
    assert "&lt;b&gt;reset&lt;/b&gt;" in page and "<b>reset</b>" not in page
    assert 'hx-trigger="every 10s"' in page and "/dashboard/live?range=1h" in page
    live = viewer.get("/dashboard/live?range=1h")
    assert live.status_code == 200 and "<html" not in live.text and 'id="chart-data"' in live.text
    # One app, or another app that has no mail.
    tenancy.create_app(store, "quiet")
    quiet = viewer.get("/dashboard?app=quiet&range=24h").text
    assert 'data-kpi="received">0<' in quiet and "No mail in this range." in quiet
    assert viewer.get("/dashboard?range=5y").status_code == 200  # unknown ranges: 24 h


def test_the_audit_log_page(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    admin.post("/suppressions?app=shop", {"email": "a@x.test"})
    admin.post("/suppressions?app=shop", {"email": "b@x.test"})
    page = admin.get("/audit").text
    assert page.count("suppression.add") == 2 and "session.login" in page and "testclient" in page
    only = admin.get("/audit?action=session.").text
    assert "suppression.add" not in only.split("<tbody>")[1] and "session.login" in only
    assert "a@x.test" in admin.get("/audit?actor=admin@org.test").text
    # an admin reads the records of their own actions only (owners read everyone's)
    assert "Nothing recorded yet." in admin.get("/audit?actor=owner@org.test").text


def test_the_vendored_files_are_what_vendored_md_says() -> None:
    notes = (STATIC / "VENDORED.md").read_text()
    for path in (
        "vendor/htmx.min.js",
        "vendor/chart.umd.min.js",
        "vendor/swagger-ui/swagger-ui-bundle.js",
        "vendor/swagger-ui/swagger-ui.css",
    ):
        digest = hashlib.sha256((STATIC / path).read_bytes()).hexdigest()
        assert f"| `{path}` |" in notes and digest in notes, path


def test_templates_escape_whatever_their_name() -> None:
    names = templates.list_templates()
    assert "message.html" in names
    for name in ("x.txt", "y.html", None):
        env_autoescape = templates.autoescape
        assert env_autoescape is True or env_autoescape(name)  # type: ignore[operator]
    rendered = templates.from_string("{{ v }}").render(v="<script>")
    assert rendered == "&lt;script&gt;"


def test_no_template_has_inline_script_or_style() -> None:
    folder = Path(templates.loader.searchpath[0])  # type: ignore[union-attr]
    for path in folder.glob("*.html"):
        text = path.read_text()
        scripts = re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", text)
        assert not scripts, (path.name, scripts)
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", text), path.name
