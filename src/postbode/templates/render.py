"""Template rendering: Jinja2 in a sandbox with bounded work and output, CSS inlined into the
HTML, a text part made from the HTML when a template has none (pure functions)."""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import css_inline
from inscriptis import get_text
from jinja2 import TemplateSyntaxError, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

MAX_OUTPUT = 1_000_000  # characters one part of a rendering may have
MAX_STEPS = 200_000  # loop turns and output pieces of one rendering
MAX_SECONDS = 1.0  # wall time of one rendering
MAX_RANGE = 10_000  # the largest range() a template may ask for
# Characters one part may build with *, +, ~, join and replace in all (kept in variables or not)
MAX_BUILT = 10 * MAX_OUTPUT
MAX_SOURCE = 500_000  # characters of one template part
# The name under which a layout receives the HTML (or text) it wraps.
CONTENT = "content"

# Methods a template may call, by the type of the value: reading ones only. Everything else
# (attributes of Python objects, __class__ and its friends, str.format) is refused.
_SAFE_METHODS: dict[type, frozenset[str]] = {
    dict: frozenset({"items", "keys", "values", "get"}),
    str: frozenset(
        {
            "upper",
            "lower",
            "title",
            "capitalize",
            "strip",
            "lstrip",
            "rstrip",
            "startswith",
            "endswith",
            "split",
        }
    ),
}


class RenderError(Exception):
    """A template that cannot be rendered: its part (`subject`, `html`, `text`, `layout.html` …),
    the line in it where known, and why."""

    def __init__(self, message: str, *, part: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.part = part
        self.line = line

    def __str__(self) -> str:
        where = f"{self.part}, line {self.line}" if self.line else self.part
        return f"{where}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {"part": self.part, "line": self.line, "message": self.message}


class _Limit(Exception):
    """The rendering did more work or made more output than allowed."""


@dataclass
class _Budget:
    steps: int
    deadline: float
    built: int = 0

    def build(self, chars: int) -> None:
        self.built += chars
        if self.built > MAX_BUILT:
            raise _Limit(f"the template built more than {MAX_BUILT} characters of strings")

    def spend(self, steps: int = 1) -> None:
        self.steps -= steps
        if self.steps < 0:
            raise _Limit(f"the template did more than {MAX_STEPS} steps (a loop too long?)")
        if self.steps % 1000 == 0 and time.monotonic() > self.deadline:
            raise _Limit(f"the template took more than {MAX_SECONDS:g} s to render")


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _spend(steps: int = 1) -> None:
    budget = _budget.get(None)
    if budget is not None:
        budget.spend(steps)


def _build(chars: int) -> None:
    budget = _budget.get(None)
    if budget is not None:
        budget.build(chars)


class _BoundedLoops(CodeGenerator):
    """Compiles every `for` loop so that each turn costs a step of the rendering's budget,
    and every `~` so that its result's size is checked before it is built."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter = nodes.Call(
            nodes.EnvironmentAttribute("bounded"), [node.iter], [], None, None, lineno=node.lineno
        )
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            escape = "context.eval_ctx.autoescape"
        else:
            escape = "True" if frame.eval_ctx.autoescape else "False"
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {escape})")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else len(str(value))


def _too_long(value: Any, times: Any) -> bool:
    if isinstance(value, str | list | tuple) and isinstance(times, int):
        return len(value) * times > MAX_OUTPUT
    return False


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedLoops
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def checked_concat(self, parts: tuple[Any, ...], autoescape: bool) -> str:
        size = sum(_size(p) for p in parts)
        if size > MAX_OUTPUT:
            raise _Limit(f"the result of ~ would be longer than {MAX_OUTPUT} characters")
        _build(size)
        return markup_join(parts) if autoescape else str_join(parts)

    def bounded(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _spend()
            yield item

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        allowed = _SAFE_METHODS.get(type(obj))
        return allowed is not None and attr in allowed

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja's default renders an empty string; a template reaching for `__class__` is told.
        raise SecurityError(f"{attribute!r} of a {type(obj).__name__} is not available")

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `user.name` reads a key of the model; only a few read-only methods are attributes.
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if (
            operator == "+"
            and isinstance(left, str | list | tuple)
            and isinstance(right, str | list | tuple)
            and len(left) + len(right) > MAX_OUTPUT
        ):
            raise _Limit(f"the result of + would be longer than {MAX_OUTPUT} characters")
        if operator == "*" and (_too_long(left, right) or _too_long(right, left)):
            raise _Limit(f"the result of * would be longer than {MAX_OUTPUT} characters")
        if operator == "+" and isinstance(left, str | list | tuple):
            _build(len(left) + _size(right))
        if operator == "*" and isinstance(left, str | list | tuple) and isinstance(right, int):
            _build(len(left) * max(right, 0))
        if operator == "*" and isinstance(right, str | list | tuple) and isinstance(left, int):
            _build(len(right) * max(left, 0))
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise _Limit("an exponent is at most 64")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("% formatting of strings is not allowed; use the format filter")
        return super().call_binop(context, operator, left, right)


def _safe_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _Limit(f"range() is at most {MAX_RANGE} long")
    return r


def _bounded_filter(name: str, limit_arg: int) -> Any:
    """A built-in filter whose width-like argument is capped (center, indent, truncate …)."""

    @pass_environment
    def apply(env: _Environment, value: Any, *args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit_arg:
                raise _Limit(f"the {name} filter takes widths up to {limit_arg}")
        original = _BUILTIN_FILTERS[name]
        return (
            original(env, value, *args, **kwargs)
            if _PASS_ENV[name]
            else original(value, *args, **kwargs)
        )

    return apply


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    size = sum(_size(i) for i in items) + len(items) * _size(d)
    if size > MAX_OUTPUT:
        raise _Limit(f"the join would be longer than {MAX_OUTPUT} characters")
    _build(size)
    result: str = _BUILTIN_FILTERS["join"](eval_ctx, items, d, attribute)
    return result


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, before, after = str(s), str(old), str(new)
    n = text.count(before) if before else len(text) + 1
    if count is not None:
        n = min(n, max(count, 0))
    size = len(text) + n * max(0, len(after) - len(before))
    if size > MAX_OUTPUT:
        raise _Limit(f"the replace would be longer than {MAX_OUTPUT} characters")
    _build(size)
    result: str = _BUILTIN_FILTERS["replace"](eval_ctx, s, old, new, count)
    return result


def _make_environment(autoescape: bool) -> _Environment:
    env = _Environment(autoescape=autoescape, keep_trailing_newline=True)
    env.globals = {"range": _safe_range}  # no lipsum, cycler, joiner, namespace: not needed
    # `format` is %-formatting: its widths make strings of any size.
    env.filters.pop("format", None)
    env.filters["truncate"] = _bounded_filter("truncate", MAX_OUTPUT)
    env.filters["indent"] = _bounded_filter("indent", 100)
    env.filters["center"] = _bounded_filter("center", 200)
    env.filters["wordwrap"] = _bounded_filter("wordwrap", 1000)
    # batch and slice make lists as long as their argument (filled)
    env.filters["batch"] = _bounded_filter("batch", MAX_RANGE)
    env.filters["slice"] = _bounded_filter("slice", MAX_RANGE)
    env.filters["join"] = _join
    env.filters["replace"] = _replace
    return env


_probe = ImmutableSandboxedEnvironment()
_BUILTIN_FILTERS: dict[str, Any] = dict(_probe.filters)
_PASS_ENV: dict[str, bool] = {
    n: getattr(f, "jinja_pass_arg", None) is not None for n, f in _BUILTIN_FILTERS.items()
}
_HTML = _make_environment(autoescape=True)
_TEXT = _make_environment(autoescape=False)


@dataclass(frozen=True)
class Source:
    """A template's parts as written: subject and text are plain text, html is HTML (its
    model values are escaped)."""

    subject: str
    html: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str | None
    text: str


def _line_of(exc: BaseException) -> int | None:
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line
    tb = exc.__traceback__
    found = None
    while tb is not None:  # Jinja maps template frames to the template's lines
        if tb.tb_frame.f_code.co_filename == "<template>":
            found = tb.tb_lineno
        tb = tb.tb_next
    return found


@functools.lru_cache(maxsize=512)
def _compiled(html: bool, source: str) -> Any:
    """A template compiled once: a batch renders the same source hundreds of times."""
    return (_HTML if html else _TEXT).from_string(source)


def _compile(env: _Environment, source: str, part: str) -> Any:
    if len(source) > MAX_SOURCE:
        raise RenderError(f"at most {MAX_SOURCE} characters", part=part)
    try:
        return _compiled(env is _HTML, source)
    except TemplateSyntaxError as exc:
        raise RenderError(exc.message or "syntax error", part=part, line=exc.lineno) from None
    except (TemplateError, RecursionError, MemoryError) as exc:
        raise RenderError(str(exc) or type(exc).__name__, part=part) from None


def check(source: Source, layout: Source | None = None) -> list[RenderError]:
    """Every syntax error of a template (and its layout), with its part and line."""
    errors: list[RenderError] = []
    parts: list[tuple[str, str | None, _Environment]] = [
        ("subject", source.subject, _TEXT),
        ("html", source.html, _HTML),
        ("text", source.text, _TEXT),
    ]
    if layout is not None:
        parts += [("layout.html", layout.html, _HTML), ("layout.text", layout.text, _TEXT)]
    for part, text, env in parts:
        if text is None:
            continue
        try:
            _compile(env, text, part)
        except RenderError as exc:
            errors.append(exc)
    return errors


def _render_part(env: _Environment, source: str, part: str, model: Mapping[str, Any]) -> str:
    template = _compile(env, source, part)
    budget = _Budget(MAX_STEPS, time.monotonic() + MAX_SECONDS)
    token = _budget.set(budget)
    size = 0
    pieces: list[str] = []
    try:
        for piece in template.generate(model):
            size += len(piece)
            if size > MAX_OUTPUT:
                raise _Limit(f"the output is longer than {MAX_OUTPUT} characters")
            budget.spend()
            pieces.append(piece)
    except _Limit as exc:
        raise RenderError(str(exc), part=part, line=_line_of(exc)) from None
    except SecurityError as exc:
        raise RenderError(f"not allowed: {exc}", part=part, line=_line_of(exc)) from None
    except UndefinedError as exc:
        raise RenderError(exc.message or "undefined", part=part, line=_line_of(exc)) from None
    except RecursionError:
        raise RenderError("the template recurses too deep", part=part) from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
        raise RenderError(f"{type(exc).__name__}: {exc}", part=part, line=_line_of(exc)) from None
    finally:
        _budget.reset(token)
    return "".join(pieces)


def _inline_css(html: str) -> str:
    # No remote stylesheets: a template must not make the server fetch URLs.
    inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_style_tags=False)
    try:
        return inliner.inline(html)
    except ValueError as exc:  # bad CSS, or text that is no Unicode (lone surrogates)
        raise RenderError(f"the CSS cannot be inlined: {exc}", part="html") from None


def text_from_html(html: str) -> str:
    """The text part a reader without HTML sees: the HTML's text, laid out as displayed."""
    text: str = get_text(html)
    return text.strip() + "\n"


def render(source: Source, model: Mapping[str, Any], layout: Source | None = None) -> Rendered:
    """The message parts of `source` for `model`, inside `layout` if given (which gets the
    rendered part as `content`). Raises RenderError naming the part and line."""
    model = dict(model)
    subject = _render_part(_TEXT, source.subject, "subject", model)
    subject = " ".join(subject.split())  # a header is one line
    html: str | None = None
    if source.html is not None:
        html = _render_part(_HTML, source.html, "html", model)
        if layout is not None and layout.html is not None:
            # the template's own rendering, its model values escaped already
            wrapped = Markup(html)  # noqa: S704
            html = _render_part(_HTML, layout.html, "layout.html", {**model, CONTENT: wrapped})
    text: str | None = None
    if source.text is not None:
        text = _render_part(_TEXT, source.text, "text", model)
        if layout is not None and layout.text is not None:
            text = _render_part(_TEXT, layout.text, "layout.text", {**model, CONTENT: text})
    if html is not None:
        html = _inline_css(html)
        if len(html) > MAX_OUTPUT:
            raise RenderError(f"the output is longer than {MAX_OUTPUT} characters", part="html")
    if text is None:
        if html is None:
            raise RenderError("a template needs html or text", part="html")
        try:
            text = text_from_html(html)
        except ValueError as exc:
            raise RenderError(f"no text can be made from the HTML: {exc}", part="html") from None
    return Rendered(subject=subject, html=html, text=text)
