"""Template rendering: layouts, escaping, CSS inlined, a text part made from the HTML, and a
sandbox that refuses or bounds hostile templates with an error naming the part and line."""

from __future__ import annotations

import re
import threading
import time

import pytest

from postbode.templates.render import MAX_OUTPUT, RenderError, Source, check, render

LAYOUT = Source(
    subject="",
    html="<html><head><style>p { color: #c00 }</style></head>"
    "<body><h1>Shop</h1>{{ content }}</body></html>",
    text="Shop\n\n{{ content }}\n-- the shop",
)


def test_a_template_renders_inside_its_layout_with_css_inlined_and_the_model_escaped() -> None:
    source = Source(
        subject="Welcome, {{ user.name }}",
        html="<p>Hello {{ user.name }}</p>"
        "<ul>{% for i in items %}<li>{{ i }}</li>{% endfor %}</ul>",
    )
    model = {"user": {"name": "<script>alert(1)</script>"}, "items": ["a", "b"]}
    out = render(source, model, LAYOUT)
    assert out.subject == "Welcome, <script>alert(1)</script>"  # a header is text
    assert out.html is not None
    assert "<script>" not in out.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out.html
    assert '<p style="color: #c00;">Hello' in out.html
    assert "<style>" not in out.html
    assert "<h1>Shop</h1>" in out.html
    # no text part given: made from the (layout-wrapped) HTML
    assert "Hello <script>alert(1)</script>" in out.text
    assert out.text.splitlines()[0] == "Shop"


def test_a_text_part_given_renders_in_the_layouts_text() -> None:
    out = render(Source(subject="s", html="<p>x</p>", text="Hi {{ n }}"), {"n": 3}, LAYOUT)
    assert out.text == "Shop\n\nHi 3\n-- the shop"


def test_a_subject_is_one_line() -> None:
    assert render(Source(subject="a\n{{ x }}\r\nb", text="t"), {"x": "y"}).subject == "a y b"


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{{ ''.__class__ }}", "'__class__' of a str is not available"),
        ("{{ x.__class__.__mro__ }}", "not available"),
        ("{{ user.__init__.__globals__ }}", "not available"),
        ("{{ range.__globals__ }}", "not available"),
        ("{{ lipsum }}", ""),  # the default globals are gone: undefined, empty
        ("{% for i in range(100000) %}{% endfor %}", r"range\(\) is at most"),
        (
            "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
            "steps|took more than",  # whichever bound comes first on a loaded machine
        ),
        ("{{ 'x' * 100000000 }}", "longer than"),
        ("{% for i in range(10000) %}{{ 'x' * 999 }}{% endfor %}", "longer than"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses"),
        ("{{ 'a'|center(100000000) }}", "center filter"),
        ("{{ '%999999999s' % 1 }}", "% formatting"),
        ("{{ 2 ** 100000000 }}", "exponent"),
        ("{{ user.update({'a': 1}) }}", "not available"),
        # doubling a string a few times, or multiplying it by replace, join, batch …
        (
            "{% set a = 'x' * 999999 %}{% set b = a ~ a %}{% set c = b ~ b %}{{ c|length }}",
            "~ would be longer",
        ),
        ("{% set a = 'x' * 999999 %}{% set b = a + a %}{{ b|length }}", r"\+ would be longer"),
        ("{{ ('x' * 999999)|replace('x', 'x' * 999999) }}", "replace would be longer"),
        ("{{ ('x' * 999999).replace('x', 'yy') }}", "not available"),
        ("{{ range(10000)|join('x' * 999999) }}", "join would be longer"),
        ("{{ [1]|batch(1000000000, 'x')|list }}", "batch filter"),
        ("{{ [1]|slice(1000000000)|list }}", "slice filter"),
        # many large strings kept in variables, none too long by itself
        ("".join(f"{{% set v{i} = 'x' * 999999 %}}" for i in range(50)), "built more than"),
    ],
)
def test_a_hostile_template_is_refused_or_bounded(template: str, says: str) -> None:
    started = time.monotonic()
    try:
        out = render(Source(subject="s", html="line one\n" + template), {"user": {}, "x": 1})
    except RenderError as exc:
        assert exc.part == "html"
        assert re.search(says, exc.message), exc.message
        if exc.line is not None:
            assert exc.line == 2
    else:
        assert says == ""
        assert out.html is not None and len(out.html) < 100
    assert time.monotonic() - started < 30  # generous: a loaded machine; the bound is ~1 s


def test_a_hostile_render_leaves_other_renders_working() -> None:
    results: list[str] = []

    def hostile() -> None:
        with pytest.raises(RenderError):
            render(
                Source(
                    subject="s",
                    text="{% for i in range(9999) %}{% for j in range(9999) %}"
                    "{% endfor %}{% endfor %}",
                ),
                {},
            )

    t = threading.Thread(target=hostile)
    t.start()
    results.append(render(Source(subject="s", text="ok {{ n }}"), {"n": 1}).text)
    t.join()
    assert results == ["ok 1"]


def test_ordinary_filters_still_work() -> None:
    out = render(
        Source(
            subject="s",
            text="{{ names|join(', ') }} {{ 'a-b'|replace('-', '+') }} "
            "{{ (names|batch(2)|list)|length }} {{ 'x' ~ 1 ~ 'y' }} {{ 'p' + 'q' }} {{ 2 + 3 }}",
        ),
        {"names": ["Ann", "Bob", "Cy"]},
    )
    assert out.text == "Ann, Bob, Cy a+b 2 x1y pq 5"
    html = render(Source(subject="s", html="{{ '<b>' ~ name }}"), {"name": "<i>"}).html
    assert html is not None and "&lt;b&gt;&lt;i&gt;" in html


def test_the_output_bound_is_the_documented_one() -> None:
    just_under = render(Source(subject="s", text="{{ 'x' * n }}"), {"n": MAX_OUTPUT - 10})
    assert len(just_under.text) == MAX_OUTPUT - 10


def test_syntax_errors_name_the_part_and_line() -> None:
    errors = check(Source(subject="{{ oops", html="<p>\n\n{% if %}</p>", text="fine"))
    assert [(e.part, e.line) for e in errors] == [("subject", 1), ("html", 3)]


def test_a_model_lookup_error_names_the_line() -> None:
    with pytest.raises(RenderError) as caught:
        render(Source(subject="s", text="a\nb\n{{ order.lines[0].price.x }}"), {"order": {}})
    assert (caught.value.part, caught.value.line) == ("text", 3)
