"""Shaping: rule syntax, token bucket, adaptive slow-down and the shaper, on a fake clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from postbode.config import Settings
from postbode.delivery.destinations import MemoryState, ShapingState, StoreState
from postbode.delivery.outcomes import Reply
from postbode.delivery.shaping import (
    CONNECTION_LEASE_SECONDS,
    CONNECTION_RETRY_SECONDS,
    STATE_STALENESS_SECONDS,
    Limits,
    Rule,
    Shaper,
    Slowdown,
    TokenBucket,
    Wait,
    is_throttling,
    parse_rules,
    rule_for,
)
from postbode.store.engine import Store

WALL = datetime(2026, 3, 1, 14, 5, 30, tzinfo=UTC)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shaper(
    rules: str = "",
    *,
    connections: int = 10,
    rate: float = 600,
    max_wait: float = 5.0,
    clock: Clock | None = None,
    state: ShapingState | None = None,
    holder: str = "",
) -> tuple[Shaper, Clock]:
    clock = clock or Clock()
    start = clock.now

    def wallclock() -> datetime:
        return WALL + timedelta(seconds=clock.now - start)

    return (
        Shaper(
            parse_rules(rules),
            Limits(connections, rate),
            state=state,
            holder=holder,
            max_wait=max_wait,
            slowdown_seconds=600,
            clock=clock,
            wallclock=wallclock,
        ),
        clock,
    )


# -- the rule syntax ----------------------------------------------------------------------------


def test_rules_parse_patterns_and_options() -> None:
    rules = parse_rules(
        "gmail.test=conn:5,rate:300; *.corp.test=rate:60/h,burst:5,adaptive:off\n"
        "fast.test=rate:10/s;*=conn:2"
    )
    assert rules == (
        Rule("gmail.test", connections=5, rate_per_minute=300.0),
        Rule("*.corp.test", rate_per_minute=1.0, burst=5, adaptive=False),
        Rule("fast.test", rate_per_minute=600.0),
        Rule("*", connections=2),
    )


def test_rules_normalise_domains_to_a_labels() -> None:
    (rule,) = parse_rules("Bücher.TEST.=rate:5")
    assert rule.pattern == "xn--bcher-kva.test"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("gmail.test", "is not domain=option:value"),
        ("gmail.test=", "is not domain=option:value"),
        ("gmail.test=conn", "is not name:value"),
        ("gmail.test=conn:five", "whole number"),
        ("gmail.test=conn:-1", "whole number"),
        ("gmail.test=rate:fast", "is not N, N/s, N/min or N/h"),
        ("gmail.test=rate:5/day", "is not N, N/s, N/min or N/h"),
        ("gmail.test=adaptive:maybe", "adaptive is on or off"),
        ("gmail.test=speed:5", "unknown option 'speed'"),
        ("a.test=rate:5;A.test=rate:6", "list 'a.test' twice"),
        ("bad..name=rate:5", "shaping rule"),
    ],
)
def test_bad_rules_are_refused_naming_the_entry(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="shaping rule") as raised:
        parse_rules(text)
    assert complaint in str(raised.value)


def test_rule_for_prefers_exact_then_longest_suffix_then_everything() -> None:
    rules = parse_rules("*=rate:1;*.test=rate:2;*.corp.test=rate:3;corp.test=rate:4")
    assert rule_for(rules, "corp.test") == Rule("corp.test", rate_per_minute=4.0)
    assert rule_for(rules, "a.corp.test") == Rule("*.corp.test", rate_per_minute=3.0)
    assert rule_for(rules, "other.test") == Rule("*.test", rate_per_minute=2.0)
    assert rule_for(rules, "example.org") == Rule("*", rate_per_minute=1.0)
    # "*.corp.test" is for subdomains only, and a suffix must end at a label boundary
    assert rule_for(parse_rules("*.corp.test=rate:3"), "corp.test") is None
    assert rule_for(parse_rules("*.corp.test=rate:3"), "xcorp.test") is None


def test_options_a_rule_leaves_out_take_the_defaults() -> None:
    s, _ = shaper("gmail.test=rate:300", connections=7, rate=900)
    assert s.configured("gmail.test") == Limits(7, 300.0)
    assert s.configured("GMail.Test") == Limits(7, 300.0)
    assert s.configured("other.test") == Limits(7, 900.0)


def test_settings_build_a_shaper_and_refuse_bad_rules() -> None:
    settings = Settings(
        shaping_rules="gmail.test=conn:5,rate:300",
        shaping_max_connections=3,
        shaping_rate_per_minute=120,
        shaping_max_wait_seconds=1.5,
    )
    s = Shaper.from_settings(settings)
    assert s.configured("gmail.test") == Limits(5, 300.0)
    assert s.configured("x.test") == Limits(3, 120.0)
    assert s.max_wait == 1.5
    with pytest.raises(ValueError, match="unknown option"):
        Shaper.from_settings(Settings(shaping_rules="x.test=bogus:1"))


def test_burst_defaults_to_a_tenth_of_the_rate() -> None:
    assert Limits(1, 600).effective_burst == 60
    assert Limits(1, 5).effective_burst == 1
    assert Limits(1, 600, burst=3).effective_burst == 3


def test_scaled_limits_never_drop_below_one() -> None:
    assert Limits(10, 600).scaled(0.5) == Limits(5, 300.0, burst=30)
    assert Limits(1, 1).scaled(1 / 16) == Limits(1, 1.0, burst=1)
    assert Limits(0, 0).scaled(0.5) == Limits(0, 0)  # no limit stays no limit
    assert Limits(10, 600).scaled(1.0) == Limits(10, 600)


# -- the token bucket ---------------------------------------------------------------------------


def test_bucket_lets_a_burst_go_then_paces_at_the_rate() -> None:
    bucket = TokenBucket(rate_per_minute=60, burst=3, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_bucket_refills_while_idle_but_never_above_the_burst() -> None:
    bucket = TokenBucket(rate_per_minute=60, burst=2, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.next_slot(0.0) == 1.0
    assert not bucket.idle(0.5)
    # an hour idle: the burst is back, no more
    assert [bucket.reserve(3600.0) for _ in range(3)] == [3600.0, 3600.0, 3601.0]


def test_bucket_booked_slots_survive_a_rate_change() -> None:
    bucket = TokenBucket(rate_per_minute=60, burst=1, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 1.0, 2.0]
    bucket.set_rate(30, 1)
    assert bucket.reserve(0.0) == 3.0  # after the ones booked
    assert bucket.reserve(0.0) == 5.0  # then every two seconds


def test_drained_bucket_has_its_next_slot_one_interval_away() -> None:
    bucket = TokenBucket(rate_per_minute=60, burst=10, now=0.0)
    bucket.reserve(0.0)
    bucket.drain(100.0)
    assert bucket.reserve(100.0) == 101.0
    assert bucket.reserve(100.0) == 102.0


def test_rate_zero_is_no_limit() -> None:
    bucket = TokenBucket(rate_per_minute=0, burst=1, now=0.0)
    assert [bucket.reserve(5.0) for _ in range(1000)] == [5.0] * 1000


# -- the adaptive slow-down -----------------------------------------------------------------


def test_slowdown_halves_holds_then_recovers_linearly() -> None:
    slow = Slowdown(hold=600, recover=600)
    assert slow.factor(0) == 1.0 and not slow.active(0)
    assert slow.signal(100, "421 4.7.0", WALL)
    assert slow.factor(100) == 0.5
    assert slow.factor(700) == 0.5  # held for ten minutes after the reply
    assert slow.factor(1000) == pytest.approx(0.75)  # half-way back
    assert slow.factor(1300) == 1.0 and not slow.active(1300)
    assert (slow.reason, slow.since) == ("421 4.7.0", WALL)


def test_slowdown_counts_a_burst_of_replies_once() -> None:
    slow = Slowdown(debounce=30)
    assert slow.signal(0, "421", WALL)
    assert not slow.signal(1, "421", WALL)  # the other connections refused at the same time
    assert not slow.signal(29, "421", WALL)
    assert slow.factor(29) == 0.5
    assert slow.signal(31, "421", WALL)  # still refused half a minute later: halve again
    assert slow.factor(31) == 0.25


def test_slowdown_replies_extend_the_hold() -> None:
    slow = Slowdown(hold=600, recover=600, debounce=30)
    slow.signal(0, "421", WALL)
    slow.signal(10, "421", WALL)  # debounced, but the remote still pushes back
    assert slow.factor(605) == 0.5
    assert slow.factor(610) == 0.5
    assert slow.factor(910) == pytest.approx(0.75)


def test_slowdown_never_goes_below_its_floor() -> None:
    slow = Slowdown(floor=1 / 16, debounce=0)
    for t in range(10):
        slow.signal(t, "421", WALL)
    assert slow.factor(10) == 1 / 16


def test_slowdown_while_recovering_halves_the_current_factor() -> None:
    slow = Slowdown(hold=600, recover=600)
    slow.signal(0, "421", WALL)
    assert slow.factor(900) == pytest.approx(0.75)
    slow.signal(900, "421", WALL)
    assert slow.factor(900) == pytest.approx(0.375)


# -- what counts as throttling ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "421 4.7.0 Too many connections, slow down",
        "421 4.3.2 Service shutting down",  # RFC 5321 §3.8: any 421
        "421-4.7.28 Our system has detected an unusual rate of\n421 4.7.28 unsolicited mail",
        "450 4.7.1 Too many messages from your IP, try later",
        "451 4.7.1 Rate limit exceeded",
        "452 4.4.5 Insufficient system storage",  # RFC 3463: X.4.5 congestion
        "451 4.3.2 Please slow down",
        "451 4.7.0 Temporary error, try again later",
        "450 Too many concurrent SMTP sessions",
        "451 4.7.1 You are being throttled",
    ],
)
def test_throttling_replies(raw: str) -> None:
    assert is_throttling(Reply.parse(raw))


@pytest.mark.parametrize(
    "raw",
    [
        "451 4.7.1 Greylisted, please try again later",
        "451 4.7.1 Greylisted, try again in 5 minutes",
        "450 4.2.2 Mailbox full",
        # One recipient receiving too fast: slowing the whole domain would not help.
        "450 4.2.1 The user you are trying to contact is receiving mail at a rate that "
        "prevents additional messages from being delivered",
        "451 4.3.0 Temporary local problem",
        "550 5.7.1 Too many connections",  # permanent: a bounce, not a pace
        "554 5.7.1 Rate limit exceeded",
        "250 2.0.0 OK",
    ],
)
def test_not_throttling(raw: str) -> None:
    assert not is_throttling(Reply.parse(raw))


def test_no_reply_is_not_throttling() -> None:
    assert not is_throttling(None)


# -- the shaper -----------------------------------------------------------------------------


def test_admits_what_fits_in_the_max_wait_and_releases_the_rest_with_their_slots() -> None:
    s, _ = shaper("dest.test=rate:60,burst:2", max_wait=3.0)
    go, waits = s.admit("dest.test", ["a", "b", "c", "d", "e", "f", "g"])
    assert go == {"a": 1000.0, "b": 1000.0, "c": 1001.0, "d": 1002.0, "e": 1003.0}
    assert set(waits) == {"f", "g"}
    assert waits["f"].until == WALL + timedelta(seconds=4)
    assert waits["g"].until == WALL + timedelta(seconds=5)
    assert waits["f"].reason == "waiting: rate limit for dest.test (60/min)"
    assert waits["f"].limit == "rate"


def booked(wait: Wait, start: float = 1000.0) -> tuple[float, str]:
    """What the queue keeps of a released delivery (next attempt, reason), on the test clock."""
    return start + (wait.until - WALL).total_seconds(), wait.reason


def test_a_waiting_delivery_keeps_its_slot_when_it_comes_back() -> None:
    s, clock = shaper("dest.test=rate:60,burst:1", max_wait=0)
    go, waits = s.admit("dest.test", ["a", "b", "c"])
    assert list(go) == ["a"] and list(waits) == ["b", "c"]
    # meanwhile new mail for the domain books later slots, not the ones b and c hold
    _, new = s.admit("dest.test", ["n"])
    assert new["n"].until == WALL + timedelta(seconds=3)
    clock.advance(1)
    go, again = s.admit("dest.test", ["b"], {"b": booked(waits["b"])})
    assert go == {"b": 1001.0} and not again
    # c came back early (someone pressed retry): it waits for its own slot again
    go, again = s.admit("dest.test", ["c"], {"c": booked(waits["c"])})
    assert not go and again["c"].until == WALL + timedelta(seconds=2)


def test_no_rate_limit_admits_everything_at_once() -> None:
    s, _ = shaper("dest.test=rate:0", max_wait=0)
    go, waits = s.admit("dest.test", range(10_000))
    assert len(go) == 10_000 and not waits


def test_domains_have_their_own_budgets() -> None:
    s, _ = shaper("*.corp.test=rate:60,burst:1", max_wait=0)
    go_a, _ = s.admit("a.corp.test", ["a1"])
    go_b, _ = s.admit("b.corp.test", ["b1"])
    assert list(go_a) == ["a1"] and list(go_b) == ["b1"]


def test_a_throttling_reply_halves_the_rate_and_says_so() -> None:
    s, clock = shaper("dest.test=conn:4,rate:120,burst:1", max_wait=0)
    _, before = s.admit("dest.test", ["a", "b", "c"])  # b and c wait at 120/min
    assert s.throttled("dest.test", Reply.parse("421 4.7.0 Too many connections, slow down"))
    assert s.limits("dest.test") == Limits(2, 60.0, burst=1)
    # b and c gave up their slots booked at the old rate; booking again, they get the new one
    clock.advance(0.5)
    _, waits = s.admit("dest.test", ["b", "c"], {k: booked(w) for k, w in before.items()})
    assert waits["b"].until == WALL + timedelta(seconds=1)
    assert waits["c"].until == WALL + timedelta(seconds=2)
    assert waits["b"].reason == (
        "waiting: rate limit for dest.test (60/min, lowered after 421 4.7.0 at 14:05:30 UTC)"
    )
    slowdown = s.slowed_down("dest.test")
    assert slowdown is not None and slowdown.reason == "421 4.7.0"
    # booked after the slow-down, a slot is kept
    clock.advance(0.5)
    go, _ = s.admit("dest.test", ["b"], {"b": booked(waits["b"])})
    assert go == {"b": 1001.0}


def test_the_rate_recovers_after_the_slowdown() -> None:
    s, clock = shaper("dest.test=rate:600", max_wait=0)
    s.throttled("dest.test", Reply.parse("421 4.7.0 Try later"))
    assert s.limits("dest.test").rate_per_minute == 300
    clock.advance(600 + 300)
    assert s.limits("dest.test").rate_per_minute == pytest.approx(450)
    clock.advance(300)
    assert s.limits("dest.test") == Limits(10, 600)
    assert s.slowed_down("dest.test") is None
    _, waits = s.admit("dest.test", range(61))
    assert waits[60].reason == "waiting: rate limit for dest.test (600/min)"


def test_adaptive_off_ignores_throttling_replies() -> None:
    s, _ = shaper("relay.test=rate:60,adaptive:off")
    assert not s.throttled("relay.test", Reply.parse("421 4.7.0 Too many connections"))
    assert s.limits("relay.test") == Limits(10, 60.0, adaptive=False)


def test_defer_books_slots_for_every_delivery() -> None:
    s, _ = shaper("dest.test=rate:60,burst:1", max_wait=5)
    s.throttled("dest.test", Reply.parse("421 Busy"))
    waits = s.defer("dest.test", ["a", "b"])
    assert [w.until for w in waits.values()] == [
        WALL + timedelta(seconds=2),
        WALL + timedelta(seconds=4),
    ]
    assert "(30/min, lowered after 421 at 14:05:30 UTC)" in waits["a"].reason


def test_connection_wait_names_the_host_and_its_limit() -> None:
    s, _ = shaper("dest.test=conn:1")
    wait = s.connection_wait("dest.test", "mx1.dest.test")
    assert wait.reason == "waiting: connection limit for mx1.dest.test (1 connection busy)"
    assert wait.until == WALL + timedelta(seconds=CONNECTION_RETRY_SECONDS)
    assert wait.limit == "connections"


# -- connection slots -----------------------------------------------------------------------


def test_connection_slots_wait_for_a_release() -> None:
    async def scenario() -> None:
        s, _ = shaper("dest.test=conn:2", max_wait=30)
        assert await s.acquire_connection("dest.test", "mx")
        assert await s.acquire_connection("dest.test", "mx")
        assert await s.acquire_connection("dest.test", "other-mx")  # counted per host
        waiting = asyncio.create_task(s.acquire_connection("dest.test", "mx"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await s.release_connection("mx")
        assert await waiting
        assert s.busy("mx") == 2

    asyncio.run(scenario())


def test_connection_slots_give_up_after_the_timeout() -> None:
    async def scenario() -> None:
        s, _ = shaper("dest.test=conn:1", max_wait=0)
        assert await s.acquire_connection("dest.test", "mx")
        assert not await s.acquire_connection("dest.test", "mx")
        s.max_wait = 0.05
        assert not await s.acquire_connection("dest.test", "mx")
        await s.release_connection("mx")
        assert s.busy("mx") == 0
        assert await s.acquire_connection("dest.test", "mx")

    asyncio.run(scenario())


def test_connection_limit_zero_is_no_limit() -> None:
    async def scenario() -> None:
        s, _ = shaper("dest.test=conn:0", max_wait=0)
        for _ in range(100):
            assert await s.acquire_connection("dest.test", "mx")
        assert s.busy("mx") == 0  # nothing counted, nothing to give back

    asyncio.run(scenario())


def test_a_dead_holders_slot_frees_itself_when_its_lease_runs_out() -> None:
    state = MemoryState()
    assert state.take_slot("mx", 1, "dead", 1000.0, CONNECTION_LEASE_SECONDS) == 0
    assert state.take_slot("mx", 1, "alive", 1000.0 + 1, CONNECTION_LEASE_SECONDS) is None
    later = 1000.0 + CONNECTION_LEASE_SECONDS
    assert state.take_slot("mx", 1, "alive", later, CONNECTION_LEASE_SECONDS) == 0
    assert not state.renew_slot("mx", 0, "dead", later + 60)


def test_shaper_connections_follow_the_lowered_limit() -> None:
    async def scenario() -> None:
        s, _ = shaper("dest.test=conn:2", max_wait=0)
        assert await s.acquire_connection("dest.test", "mx1")
        s.throttled("dest.test", Reply.parse("421 4.7.0 Too many connections"))
        assert not await s.acquire_connection("dest.test", "mx1")  # now 1 allowed
        assert "(1 connection busy, lowered after 421 4.7.0 at 14:05:30 UTC)" in (
            s.connection_wait("dest.test", "mx1").reason
        )
        await s.release_connection("mx1")
        assert await s.acquire_connection("dest.test", "mx1")

    asyncio.run(scenario())


def test_pace_waits_until_the_slot() -> None:
    async def scenario() -> None:
        s = Shaper(max_wait=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await s.pace(s.clock() + 0.05)
        assert loop.time() - start >= 0.04
        await s.pace(s.clock() - 10)  # a slot in the past: no wait

    asyncio.run(scenario())


# -- shared state: two workers (processes, nodes) share one store -------------------------------


def two_workers(store: Store, rules: str, **options: float) -> tuple[Shaper, Shaper, Clock]:
    clock = Clock(WALL.timestamp())
    one, _ = shaper(rules, clock=clock, state=StoreState(store), holder="one", **options)
    two, _ = shaper(rules, clock=clock, state=StoreState(store), holder="two", **options)
    return one, two, clock


def test_workers_book_from_one_shared_bucket(store: Store) -> None:
    one, two, clock = two_workers(store, "dest.test=rate:60,burst:2", max_wait=3.0)
    go_one, _ = one.admit("dest.test", ["a", "b", "c"])
    go_two, waits = two.admit("dest.test", ["d", "e", "f", "g"])
    start = clock.now
    assert sorted(go_one.values()) == [start, start, start + 1]
    # the second worker's slots follow the first's: one a second for the two together
    assert go_two == {"d": start + 2, "e": start + 3}
    assert [w.until for w in waits.values()] == [WALL + timedelta(seconds=s) for s in (4, 5)]
    # a delivery released by one worker keeps its slot when the other claims it
    clock.advance(4)
    go, again = one.admit("dest.test", ["f"], {"f": booked(waits["f"], WALL.timestamp())})
    assert go == {"f": start + 4} and not again


def test_a_throttling_reply_one_worker_meets_slows_the_other(store: Store) -> None:
    one, two, clock = two_workers(store, "dest.test=conn:4,rate:120,burst:1", max_wait=0)
    assert two.limits("dest.test") == Limits(4, 120.0, burst=1)
    assert one.throttled("dest.test", Reply.parse("421 4.7.0 Too many connections"))
    # the other worker, that only reads, sees it once its copy is STATE_STALENESS old
    clock.advance(STATE_STALENESS_SECONDS + 0.01)
    assert two.limits("dest.test") == Limits(2, 60.0, burst=1)
    # booking always sees it at once, and a burst of 421s from both counts once
    assert not two.throttled("dest.test", Reply.parse("421 4.7.0 Too many connections"))
    go, waits = two.admit("dest.test", ["x", "y"])
    assert list(go) == ["x"]
    assert "(60/min, lowered after 421 4.7.0 at 14:05:30 UTC)" in waits["y"].reason


def test_connection_slots_are_shared_and_expire_with_their_lease(store: Store) -> None:
    async def scenario() -> None:
        one, two, clock = two_workers(store, "dest.test=conn:2", max_wait=0)
        assert await one.acquire_connection("dest.test", "mx1.dest.test")
        assert await two.acquire_connection("dest.test", "mx1.dest.test")
        assert not await one.acquire_connection("dest.test", "mx1.dest.test")
        assert not await two.acquire_connection("dest.test", "mx1.dest.test")
        assert one.busy("mx1.dest.test") == 2
        await two.release_connection("mx1.dest.test")
        assert await one.acquire_connection("dest.test", "mx1.dest.test")
        # worker one dies holding both: its slots free themselves when the leases run out
        clock.advance(CONNECTION_LEASE_SECONDS + 1)
        assert two.busy("mx1.dest.test") == 0
        assert await two.acquire_connection("dest.test", "mx1.dest.test")
        assert await two.acquire_connection("dest.test", "mx1.dest.test")
        assert not await two.acquire_connection("dest.test", "mx1.dest.test")
        for held in one._held.get("mx1.dest.test", []):
            assert held.renewer is not None
            held.renewer.cancel()

    asyncio.run(scenario())
