"""Route patterns and matching order; routes in the store on both dialects."""

from __future__ import annotations

import pytest

from postbode import tenancy
from postbode.inbound.routes import (
    Route,
    RouteError,
    check_pattern,
    create_route,
    delete_route,
    list_routes,
    match,
    update_route,
)
from postbode.store.engine import Store


def table(*patterns: str) -> dict[str, Route]:
    return {
        p: Route(i, 1, p, "post", "https://app.example/in", "native")
        for i, p in enumerate(patterns, 1)
    }


def test_exact_address_wins_over_mailbox_hash_and_catch_all() -> None:
    routes = table("support+vip@in.shop.test", "support@in.shop.test", "*@in.shop.test")
    found = match(routes, "Support+VIP@In.Shop.Test")
    assert found is not None and found.route.pattern == "support+vip@in.shop.test"
    assert found.mailbox_hash == "VIP"  # the hash keeps the sender's case


def test_mailbox_hash_goes_to_the_base_address_with_the_hash() -> None:
    routes = table("support@in.shop.test", "*@in.shop.test")
    found = match(routes, "support+order-42@in.shop.test")
    assert found is not None
    assert (found.route.pattern, found.mailbox_hash) == ("support@in.shop.test", "order-42")
    # only the first + separates: the rest is the hash
    found = match(routes, "support+a+b@in.shop.test")
    assert found is not None and found.mailbox_hash == "a+b"


def test_catch_all_takes_the_rest_of_its_domain_only() -> None:
    routes = table("support@in.shop.test", "*@in.shop.test")
    found = match(routes, "sales+q1@in.shop.test")
    assert found is not None
    assert (found.route.pattern, found.mailbox_hash) == ("*@in.shop.test", "q1")
    assert match(routes, "support@other.test") is None
    assert match(routes, "support@sub.in.shop.test") is None
    assert match(routes, "not-an-address") is None


def test_without_catch_all_unknown_addresses_match_nothing() -> None:
    assert match(table("support@in.shop.test"), "sales@in.shop.test") is None


@pytest.mark.parametrize(
    ("pattern", "stored"),
    [
        ("Support@IN.shop.test.", "support@in.shop.test"),
        ("*@in.shop.test", "*@in.shop.test"),
        ("  a.b-c+d@in.shop.test ", "a.b-c+d@in.shop.test"),
    ],
)
def test_patterns_are_stored_in_one_form(pattern: str, stored: str) -> None:
    assert check_pattern(pattern)[0] == stored


@pytest.mark.parametrize(
    "pattern",
    ["in.shop.test", "@in.shop.test", "sup*@in.shop.test", "a b@x.test", "x@", "<a>@x.test"],
)
def test_bad_patterns_are_refused_naming_the_field(pattern: str) -> None:
    with pytest.raises(RouteError) as caught:
        check_pattern(pattern)
    assert caught.value.field == "match"


def test_routes_belong_to_an_inbound_domain_of_the_app(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    other = tenancy.create_app(store, "other")
    tenancy.add_domain(store, "shop", "shop.test")  # sending only
    tenancy.add_domain(store, "other", "in.other.test", inbound=True)
    with pytest.raises(RouteError, match="not an inbound domain"):
        create_route(store, shop.app_id, "support@shop.test", url="https://a.example/")
    with pytest.raises(RouteError, match="not an inbound domain"):
        create_route(store, shop.app_id, "support@in.other.test", url="https://a.example/")
    # the domain becomes inbound; the route can then be made
    tenancy.add_domain(store, "shop", "shop.test", inbound=True)
    created = create_route(store, shop.app_id, "support@shop.test", url="https://a.example/")
    assert created["secret"].startswith("whsec_") and created["action"] == "post"
    with pytest.raises(RouteError) as conflict:
        create_route(store, shop.app_id, "SUPPORT@shop.test", url="https://b.example/")
    assert conflict.value.status == 409
    assert [r["match"] for r in list_routes(store, shop.app_id)] == ["support@shop.test"]
    assert list_routes(store, other.app_id) == []


def test_actions_urls_and_formats_are_checked(store: Store) -> None:
    shop = tenancy.create_app(store, "shop")
    tenancy.add_domain(store, "shop", "in.shop.test", inbound=True)
    with pytest.raises(RouteError, match="needs a URL") as caught:
        create_route(store, shop.app_id, "a@in.shop.test")
    assert caught.value.field == "url"
    with pytest.raises(RouteError, match="http:// or https://"):
        create_route(store, shop.app_id, "a@in.shop.test", url="ftp://x.example/")
    with pytest.raises(RouteError) as bad_format:
        create_route(store, shop.app_id, "a@in.shop.test", url="https://x.example/", format="x")
    assert bad_format.value.field == "format"
    held = create_route(store, shop.app_id, "hold@in.shop.test", action="hold")
    rejected = create_route(store, shop.app_id, "no@in.shop.test", action="reject")
    assert held["url"] is None and rejected["action"] == "reject"
    changed = update_route(
        store, shop.app_id, held["id"], action="post", url="https://x.example/", format="postmark"
    )
    assert (changed["action"], changed["format"]) == ("post", "postmark")
    with pytest.raises(RouteError, match="needs a URL"):
        update_route(store, shop.app_id, held["id"], url=None)
    delete_route(store, shop.app_id, held["id"])
    with pytest.raises(RouteError) as gone:
        delete_route(store, shop.app_id, held["id"])
    assert gone.value.status == 404
