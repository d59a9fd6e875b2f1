"""The Templates page: create, preview with a test model (the frame's HTML is what the API's
validation and a send render), errors with their line, versions made live, the A/B test page
with its verdict; viewers see and cannot change."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from urllib.parse import quote

from postbode.store.engine import Store
from postbode.templates import abtest, manage

from .conftest import Browser, Org

LAYOUT_HTML = "<html><head><style>p { color: red }</style></head><body>{{ content }}</body></html>"


def test_create_preview_and_version(ui: tuple[Store, Org, Callable], admin: Browser) -> None:
    store, org, _ = ui
    manage.create_template(store, org.shop.app_id, "base", subject="-", html=LAYOUT_HTML)
    created = admin.post(
        "/templates?app=shop",
        {
            "alias": "welcome",
            "subject": "Hi {{ name }}",
            "html": "<p>Hello {{ name }}</p>",
            "layout": "base",
        },
    )
    assert "Template created" in admin.flash(created)
    model = {"name": "<script>x</script>"}
    page = admin.get(f"/templates/welcome?app=shop&model={quote(json.dumps(model))}")
    assert page.status_code == 200
    assert 'sandbox=""' in page.text and "Hi &lt;script&gt;x&lt;/script&gt;" in page.text
    frame = admin.get(f"/templates/welcome/preview?app=shop&model={quote(json.dumps(model))}")
    assert "sandbox" in frame.headers["content-security-policy"]
    api = manage.validate(store, org.shop.app_id, alias="welcome", model=model)
    assert frame.text == api["rendered"]["html"]
    assert '<p style="color: red;">Hello &lt;script&gt;x&lt;/script&gt;</p>' in frame.text
    assert html.escape(api["rendered"]["text"].strip(), quote=False) in page.text

    broken = admin.get(f"/templates/welcome?app=shop&model={quote('{nope')}")
    assert "the model is not JSON" in broken.text

    saved = admin.post(
        "/templates/welcome?app=shop",
        {"subject": "Hey {{ name }}", "html": "<p>\n{{ name.nope( }}</p>", "layout": "base"},
    )
    assert "line 2" in admin.flash(saved)
    saved = admin.post(
        "/templates/welcome?app=shop", {"subject": "Hey {{ name }}", "text": "Hey", "layout": ""}
    )
    assert "Version 2 saved (not live" in admin.flash(saved)
    live = admin.post("/templates/welcome/live?app=shop", {"version": "2"})
    assert "Version 2 is live" in admin.flash(live)
    assert manage.get_template(store, org.shop.app_id, "welcome")["subject"] == "Hey {{ name }}"
    listed = admin.get("/templates?app=shop")
    assert listed.status_code == 200 and "Sent (30 days)" in listed.text


def test_the_ab_test_page_shows_figures_and_verdict(
    ui: tuple[Store, Org, Callable], admin: Browser, viewer: Browser
) -> None:
    store, org, _ = ui
    manage.create_template(store, org.shop.app_id, "news", subject="News", text="hi")
    test = abtest.create_test(
        store,
        org.shop.app_id,
        template="news",
        name="subjects",
        variants=[{"name": "A", "weight": 1}, {"name": "B", "subject": "Big news", "weight": 1}],
    )
    page = admin.get(f"/ab-tests/{test['id']}?app=shop")
    assert page.status_code == 200
    assert "keep testing (n too small" in page.text and "Big news" in page.text
    assert f"/ab-tests/{test['id']}" in admin.get("/templates?app=shop").text
    assert "end-test" not in viewer.get(f"/ab-tests/{test['id']}?app=shop").text
    ended = admin.post(f"/ab-tests/{test['id']}/end?app=shop", {"winner": "B"})
    assert "B is live" in admin.flash(ended)
    assert manage.get_template(store, org.shop.app_id, "news")["subject"] == "Big news"
    assert admin.get("/ab-tests/999?app=shop").status_code == 404
