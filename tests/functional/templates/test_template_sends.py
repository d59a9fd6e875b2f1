"""Sends made from templates, end to end: the same rendering through the API's validation,
a send over HTTP, and one over SMTP (X-Postbode-Template), as the receiving MX gets it: CSS
inlined, a text part, the model's HTML escaped; hostile templates fail alone."""

from __future__ import annotations

import json
from email.message import EmailMessage

import httpx
from sqlalchemy import select

from postbode import tenancy
from postbode.store.engine import Store
from postbode.store.schema import messages
from postbode.testing.servers import HttpPostbode, submit
from postbode.testing.sink import SmtpSink

LAYOUT = {
    "alias": "layout",
    "subject": "-",
    "html": "<html><head><style>.brand { color: #0a0 } p { margin: 0 }</style></head>"
    "<body><div class='brand'>Shop</div>{{ content }}</body></html>",
}
WELCOME = {
    "alias": "welcome",
    "subject": "Welcome, {{ user.name }}",
    "html": "<p>Hello {{ user.name }}, your plan is {{ plan }}.</p>",
    "layout": "layout",
}
MODEL = {"user": {"name": "<script>alert('x')</script>"}, "plan": "Gold"}


def _parts(message: EmailMessage) -> tuple[str, str]:
    html = message.get_body(("html",))
    text = message.get_body(("plain",))
    assert html is not None and text is not None, message.as_string()[:2000]
    # the wire's CRLF line ends, as the API's JSON has them: LF
    return (
        html.get_content().replace("\r\n", "\n"),
        text.get_content().replace("\r\n", "\n"),
    )


def test_api_preview_and_delivered_copy_render_the_same(
    api: httpx.Client,
    mx_sink: SmtpSink,
    postbode: HttpPostbode,
    shop: tenancy.NewApp,
    store: Store,
) -> None:
    assert api.post("/api/v1/templates", json=LAYOUT).status_code == 201
    assert api.post("/api/v1/templates", json=WELCOME).status_code == 201
    preview = api.post("/api/v1/templates/welcome/validate", json={"model": MODEL}).json()
    assert preview["valid"], preview
    expected = preview["rendered"]
    assert "&lt;script&gt;" in expected["html"] and "<script>" not in expected["html"]
    assert '<div class="brand" style="color: #0a0;">Shop</div>' in expected["html"]
    assert "<style>" not in expected["html"]

    sent = api.post(
        "/api/v1/messages",
        json={
            "from": "orders@shop.test",
            "to": ["ann@dest.test"],
            "template": "welcome",
            "model": MODEL,
        },
    )
    assert sent.status_code == 202, sent.text
    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = "bob@dest.test"
    msg["Subject"] = "ignored: the template's subject is used"
    msg["X-Postbode-Template"] = "welcome"
    msg["X-Postbode-Model"] = json.dumps(MODEL)
    msg.set_content("ignored")
    submit(postbode, shop, msg)

    received = {r.rcpt_tos[0]: r for r in mx_sink.wait_for_sync(2, timeout=30)}
    for rcpt in ("ann@dest.test", "bob@dest.test"):
        message = received[rcpt].message
        assert message["Subject"] == expected["subject"] == "Welcome, <script>alert('x')</script>"
        assert "X-Postbode-Template" not in message and "X-Postbode-Model" not in message
        html, text = _parts(message)
        assert html.strip() == expected["html"].strip()
        assert text.strip() == expected["text"].strip()
        assert "Hello <script>alert('x')</script>, your plan is Gold." in text
    with store.read() as conn:
        rows = conn.execute(select(messages.c.template, messages.c.template_version)).all()
    assert sorted(rows) == [("welcome", 1), ("welcome", 1)]


def test_a_hostile_template_fails_its_send_alone_and_the_server_stays_up(
    api: httpx.Client, mx_sink: SmtpSink, postbode: HttpPostbode, shop: tenancy.NewApp
) -> None:
    api.post(
        "/api/v1/templates",
        json={
            "alias": "loop",
            "subject": "s",
            "text": "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}",
        },
    )
    api.post(
        "/api/v1/templates",
        json={
            "alias": "huge",
            "subject": "s",
            "text": "{% for i in range(9999) %}{{ 'x' * 9999 }}{% endfor %}",
        },
    )
    api.post(
        "/api/v1/templates",
        json={"alias": "peek", "subject": "s", "text": "line 1\n{{ user.__class__ }}"},
    )
    for alias, says in (
        ("loop", ("steps", "took more than")),  # whichever bound comes first
        ("huge", ("longer than",)),
        ("peek", ("__class__",)),
    ):
        refused = api.post(
            "/api/v1/messages",
            json={
                "from": "orders@shop.test",
                "to": ["x@dest.test"],
                "template": alias,
                "model": {"user": {}},
            },
        )
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "template_render"
        assert any(s in error["message"] for s in says), error["message"]
    assert (
        api.post(
            "/api/v1/messages",
            json={"from": "orders@shop.test", "to": ["x@dest.test"], "template": "nope"},
        ).json()["error"]["field"]
        == "template"
    )

    msg = EmailMessage()
    msg["From"] = "orders@shop.test"
    msg["To"] = "y@dest.test"
    msg["X-Postbode-Template"] = "peek"
    msg["X-Postbode-Model"] = "{}"
    msg.set_content("x")
    try:
        submit(postbode, shop, msg)
    except Exception as exc:  # smtplib raises on the 550 to DATA
        assert "5.6.0" in str(exc) and "__class__" in str(exc)
    else:
        raise AssertionError("the hostile template was accepted over SMTP")

    ok = api.post(
        "/api/v1/messages",
        json={
            "from": "orders@shop.test",
            "to": ["z@dest.test"],
            "subject": "still here",
            "text": "fine",
        },
    )
    assert ok.status_code == 202
    (got,) = mx_sink.wait_for_sync(1, timeout=30)
    assert got.message["Subject"] == "still here"
