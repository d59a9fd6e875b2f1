"""The dashboard's sending health (each app's rate against its baseline, bounce and complaint
rates against their thresholds, with a cue) and its per-template figures; a credential's own
limits on the app page; a message cancelled whole from its page."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, insert, select

from postbode import tenancy
from postbode.abuse import limits
from postbode.events.record import Event, record
from postbode.events.types import EventType
from postbode.store.engine import Store
from postbode.store.schema import audit_log, deliveries, stat_counters, system_values
from postbode.templates import manage
from postbode.web.ui.dashboard import NEAR, cue

from .conftest import Browser, Org


@pytest.mark.parametrize(
    ("value", "threshold", "judged", "expected"),
    [
        (None, 0.1, True, "none"),  # no figure yet
        (5.0, None, True, "none"),  # not judged (a new app's rate)
        (0.0, 0.1, True, "ok"),
        (0.1 * NEAR - 0.001, 0.1, True, "ok"),
        (0.1 * NEAR, 0.1, True, "near"),
        (0.1, 0.1, True, "near"),  # at the threshold: a detector holds only above it
        (0.11, 0.1, True, "over"),
        (0.5, 0.1, False, "near"),  # over, on too few deliveries for the detector to act
    ],
)
def test_cue(value: float | None, threshold: float | None, judged: bool, expected: str) -> None:
    assert cue(value, threshold, judged) == expected


def _counters(store: Store, app_id: int, rows: list[tuple[datetime, str, int]]) -> None:
    with store.write() as conn:
        conn.execute(
            insert(stat_counters),
            [
                {
                    "app_id": app_id,
                    "stream": "transactional",
                    "tag": "",
                    "bucket": at,
                    "event_type": kind,
                    "count": n,
                    "bot_count": 0,
                }
                for at, kind, n in rows
            ],
        )


def _row(page: str, app: str, figure: str) -> str:
    card = page[page.index(f'data-app="{app}"') :]
    return card[card.index(f'data-figure="{figure}"') :][:1500]


def test_the_dashboard_shows_each_apps_health_with_a_cue(
    ui: tuple[Store, Org, Callable], viewer: Browser
) -> None:
    store, org, _ = ui
    with store.write() as conn:  # an earlier test's release of an app with the same id
        conn.execute(delete(system_values).where(system_values.c.name.like("abuse.%")))
    quiet = tenancy.create_app(store, "quiet")
    now = datetime.now(UTC)
    minute = now.replace(second=0, microsecond=0)
    # shop: 2/min at this hour a week ago, 150 in this minute (a spike above 100/min), and
    # 3 complaints of 300 delivered (1 %, over 0.3 %, but on fewer than 1000 deliveries).
    _counters(
        store,
        org.shop.app_id,
        [
            (
                now.replace(minute=0, second=0, microsecond=0) - timedelta(weeks=1),
                "message.received",
                120,
            ),
            (minute, "message.received", 150),
            (minute, "delivery.delivered", 300),
            (minute, "message.complained", 3),
        ],
    )
    page = viewer.get("/dashboard").text
    assert "Sending health now" in page
    rate = _row(page, "shop", "rate")
    assert 'data-cue="over"' in rate[:80] and "150.0/min" in rate
    assert "baseline 2.0/min" in rate and "spike above 100/min" in rate
    assert "<meter" in rate
    complaint = _row(page, "shop", "complaint")
    assert 'data-cue="near"' in complaint[:80] and "1.00 %" in complaint
    assert "3 of 300 delivered" in complaint and "holds above 0.3 % of ≥ 1000" in complaint
    bounce = _row(page, "shop", "bounce")
    assert 'data-cue="ok"' in bounce[:80] and "0.0 %" in bounce
    # An app with no mail and no history: nothing judged, said in words.
    assert 'data-cue="none"' in _row(page, "quiet", "rate")[:80]
    assert "not judged" in _row(page, "quiet", "rate")
    # One app in view: only its figures (and on the live part the htmx poll fetches).
    live = viewer.get("/dashboard/live?app=quiet&range=24h").text
    assert 'data-app="quiet"' in live and 'data-app="shop"' not in live
    assert quiet.app_id != org.shop.app_id


def _send(client: Any, key: str, **fields: Any) -> dict[str, Any]:
    body = {"from": "orders@shop.test", "to": ["a@dest.test"], **fields}
    answer = client.post("/api/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 202, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_the_dashboard_shows_each_templates_figures_for_its_range_and_app(
    ui: tuple[Store, Org, Callable], viewer: Browser
) -> None:
    store, org, _ = ui
    tenancy.add_domain(store, "shop", "shop.test")
    other = tenancy.create_app(store, "other")
    manage.create_template(store, org.shop.app_id, "welcome", subject="Hi {{ n }}", text="x")
    manage.create_template(store, org.shop.app_id, "receipt", subject="Paid", text="y")
    sent = [
        _send(
            viewer.client,
            org.shop.api_key,
            template="welcome",
            model={"n": i},
            to=[f"r{i}@dest.test", f"s{i}@dest.test"],
        )
        for i in range(2)
    ]
    _send(viewer.client, org.shop.api_key, template="receipt", model={})
    _send(viewer.client, org.shop.api_key, subject="Not from a template", text="z")
    # What the pipeline and the tracker would record for welcome's four recipients (each
    # event carrying the message's template, as they write it).
    r = [(uuid.UUID(m["id"]), rc) for m in sent for rc in m["recipients"]]
    happened = [EventType.DELIVERY_DELIVERED] * 3 + [EventType.DELIVERY_BOUNCED]
    welcome = "welcome"
    events = [
        Event(
            app_id=org.shop.app_id,
            type=kind,
            template=welcome,
            message_id=message_id,
            delivery_id=uuid.UUID(rc["delivery_id"]),
            recipient=rc["email"],
        )
        for (message_id, rc), kind in zip(r, happened, strict=True)
    ]
    shop = org.shop.app_id
    events += [
        Event(shop, EventType.MESSAGE_OPENED, template=welcome, message_id=r[0][0]),
        Event(  # a scanner's, as the tracker records one
            app_id=shop,
            type=EventType.MESSAGE_OPENED,
            template=welcome,
            message_id=r[0][0],
            data={"bot": True},
            bot=True,
        ),
        Event(shop, EventType.MESSAGE_CLICKED, template=welcome, message_id=r[1][0]),
    ]
    with store.write() as conn:
        record(conn, events)

    def section_of(page: str) -> str:
        section = page[page.index('id="template-stats"') :]
        return section[: section.index("</section>")]

    # Part of the page itself, over any range (read from the counters), and alone.
    shell = viewer.get("/dashboard?app=shop&range=24h").text
    week = viewer.get("/dashboard?app=shop&range=7d").text
    assert "Count them" not in week and 'hx-trigger="load"' not in week
    page = viewer.get("/dashboard/templates?app=shop&range=24h").text
    section = section_of(page)
    assert section_of(shell) == section == section_of(week)
    rows = re.findall(r'<tr data-template="([^"]+)">', section)
    assert rows == ["welcome", "receipt"]  # most sent first; untemplated mail is not listed
    row = section[section.index('data-template="welcome"') :]
    row = row[: row.index("</tr>")]
    cells = dict(re.findall(r'data-stat="(\w+)">(\d+)', row))
    assert cells == {"sent": "4", "delivered": "3", "bounced": "1", "opened": "1", "clicked": "1"}
    assert "75.0\u202f%" in row  # delivered 3 of 4 ended
    assert "33.3\u202f%" in row  # opened by a person: 1 of 3 delivered (the bot's is not)
    assert "/templates/welcome?app=shop" in row
    # The same figures as GET /api/v1/stats?template= (the same counting).
    api = viewer.client.get(
        "/api/v1/stats",
        params={"template": "welcome", "range": "24h"},
        headers={"Authorization": f"Bearer {org.shop.api_key}"},
    ).json()["summary"]
    assert api["sent"] == 4 and api["totals"]["delivery.delivered"] == 3
    # The Templates page counts them the same way.
    listed = viewer.get("/templates?app=shop").text
    assert re.search(r"<code>welcome</code>.*?<td>4</td>\s*<td>75.0", listed, re.S)

    # The dashboard's range and app filter them: a range before they were sent, another app.
    since = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M")
    until = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    past = viewer.get(
        f"/dashboard/templates?app=shop&range=custom&since={since}&until={until}"
    ).text
    assert "No mail made from a template in this range." in past
    theirs = viewer.get("/dashboard/templates?app=other&range=24h").text
    assert "No mail made from a template in this range." in theirs
    # The organisation's view names each template's app.
    everything = viewer.get("/dashboard/templates?range=24h").text
    assert "<th>App</th>" in everything and 'data-template="welcome"' in everything
    assert other.app_id != org.shop.app_id


def test_a_credentials_own_limits_are_set_from_the_app_page_and_audited(
    ui: tuple[Store, Org, Callable], admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    (key,) = [c for c in tenancy.list_credentials(store, "shop") if c["kind"] == "api"]
    other = tenancy.create_app(store, "other")
    (theirs,) = [c for c in tenancy.list_credentials(store, "other") if c["kind"] == "api"]
    page = admin.get("/settings/apps/shop").text
    assert f'data-credential="{key["id"]}"' in page
    path = f"/settings/apps/shop/credentials/{key['id']}/limits"
    assert viewer.post(path, {"per_minute": "5"}).status_code == 403
    saved = admin.post(path, {"per_minute": "30", "per_hour": "", "per_day": "1000"})
    assert f"credential {key['id']} saved" in admin.flash(saved)
    with store.read() as conn:
        assert limits.get_limits(conn, org.shop.app_id, key["id"]) == limits.Limits(30, None, 1000)
        assert limits.get_limits(conn, org.shop.app_id) == limits.Limits()  # the app's: untouched
        logged = conn.execute(
            select(audit_log.c.action, audit_log.c.target, audit_log.c.data).order_by(
                audit_log.c.id.desc()
            )
        ).first()
    assert logged is not None
    assert (logged.action, logged.target) == ("app.limits", f"shop credential {key['id']}")
    assert logged.data == {"per_minute": 30, "per_hour": None, "per_day": 1000}
    shown = viewer.get("/settings/apps/shop").text
    form = shown[shown.index(f'data-credential="{key["id"]}"') :][:2500]
    assert 'name="per_minute" min="0" max="2147483647" value="30"' in form
    assert 'value="1000"' in form and "disabled" in form  # a viewer sees, cannot change
    assert re.search(rf'data-limits="{key["id"]}">30/min · 1\u202f000/day<', shown), (
        "the table lists a credential's own limits"
    )

    bad = admin.post(path, {"per_minute": "lots"})
    assert "per_minute" in admin.flash(bad)
    # Another app's credential is not this app's to change, by id or otherwise.
    stray = admin.post(f"/settings/apps/shop/credentials/{theirs['id']}/limits", {"per_day": "1"})
    assert stray.status_code == 404
    with store.read() as conn:
        assert limits.get_limits(conn, other.app_id, theirs["id"]) == limits.Limits()
        assert limits.get_limits(conn, org.shop.app_id, key["id"]).per_minute == 30


def test_a_message_is_cancelled_from_its_page(
    ui: tuple[Store, Org, Callable], admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    tenancy.add_domain(store, "shop", "shop.test")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    sent = _send(
        admin.client,
        org.shop.api_key,
        subject="Your reminder",
        text="x",
        to=["a@dest.test", "b@dest.test"],
        send_at=later,
    )
    path = f"/messages/{sent['id']}"
    page = admin.get(path).text
    assert f'action="{path}/cancel"' in page
    assert (
        'data-confirm="Cancel this message? 2 deliveries not sent yet will never be sent."' in page
    )
    assert f'action="{path}/cancel"' not in viewer.get(path).text
    assert viewer.post(f"{path}/cancel").status_code == 403

    done = admin.post(f"{path}/cancel")
    assert "Message cancelled: 2 deliveries will not be sent." in admin.flash(done)
    with store.read() as conn:
        states = set(conn.execute(select(deliveries.c.status)).scalars())
        logged = conn.execute(select(audit_log.c.action, audit_log.c.target)).all()
    assert states == {"cancelled"}
    assert ("message.cancel", sent["id"]) in [tuple(row) for row in logged]
    after = admin.get(path).text
    assert f'action="{path}/cancel"' not in after and "delivery.cancelled" in after
    again = admin.post(f"{path}/cancel")
    assert "Nothing to cancel" in admin.flash(again)
