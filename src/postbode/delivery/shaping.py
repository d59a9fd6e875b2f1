"""Traffic shaping per destination: MX connections, messages per minute, adaptive slow-down."""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import re
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, Self

from postbode.delivery.destinations import DestinationRecord, MemoryState, ShapingState, StoreState
from postbode.delivery.mx import to_ascii_domain
from postbode.delivery.outcomes import Reply
from postbode.runner.owner import worker_name
from postbode.store.schema import utcnow

if TYPE_CHECKING:
    from postbode.config import Settings
    from postbode.store.engine import Store

__all__ = [
    "Limits",
    "Rule",
    "Shaper",
    "Slowdown",
    "TokenBucket",
    "Wait",
    "is_throttling",
    "parse_rules",
    "rule_for",
]

log = logging.getLogger(__name__)

SLOWDOWN_FLOOR = 1 / 16  # repeated slow-downs never take a destination below this share
SLOWDOWN_DEBOUNCE = 30.0  # seconds: replies within this of a slow-down do not lower it again
CONNECTION_RETRY_SECONDS = 10.0  # when no connection slot frees in time: look again after this
CONNECTION_LEASE_SECONDS = 60.0  # a connection slot's lease, renewed while the connection is open
# How old a process's copy of a destination's shared state may be when it only reads it (the
# connection limit, the queue view): a slow-down learnt by another process applies here within
# this. Booking rate slots and recording a throttling reply always use the current state.
STATE_STALENESS_SECONDS = 1.0
SLOT_POLL_SECONDS = (0.05, 0.5)  # first and longest pause between looks for a free slot


# -- rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits for one destination; 0 means "no limit"."""

    connections: int
    """Concurrent SMTP connections to each MX host of the domain."""
    rate_per_minute: float
    """Messages per minute to the recipient domain."""
    burst: int = 0
    """Messages that may go at once before the rate applies (0: a tenth of a minute's rate)."""
    adaptive: bool = True
    """Whether throttling replies lower the limits for a while."""

    @property
    def effective_burst(self) -> int:
        if self.burst > 0:
            return self.burst
        return max(1, math.floor(self.rate_per_minute / 10))

    def scaled(self, factor: float) -> Limits:
        """These limits times an adaptive `factor` (0 < factor ≤ 1); never below one."""
        if factor >= 1.0:
            return self
        return replace(
            self,
            connections=max(1, math.floor(self.connections * factor)) if self.connections else 0,
            rate_per_minute=max(1.0, self.rate_per_minute * factor) if self.rate_per_minute else 0,
            burst=max(1, math.floor(self.effective_burst * factor)) if self.rate_per_minute else 0,
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """A `shaping_rules` entry: the options it sets for domains matching `pattern`."""

    pattern: str  # "gmail.test", "*.corp.test" (subdomains only) or "*" (every domain)
    connections: int | None = None
    rate_per_minute: float | None = None
    burst: int | None = None
    adaptive: bool | None = None

    def apply(self, defaults: Limits) -> Limits:
        """`defaults` with the options this rule sets."""
        return Limits(
            connections=defaults.connections if self.connections is None else self.connections,
            rate_per_minute=(
                defaults.rate_per_minute if self.rate_per_minute is None else self.rate_per_minute
            ),
            burst=defaults.burst if self.burst is None else self.burst,
            adaptive=defaults.adaptive if self.adaptive is None else self.adaptive,
        )


_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(?:/(s|sec|m|min|h|hour))?$")
_PER_MINUTE = {None: 1.0, "s": 60.0, "sec": 60.0, "m": 1.0, "min": 1.0, "h": 1 / 60, "hour": 1 / 60}


def parse_rules(text: str) -> tuple[Rule, ...]:
    """Parse `shaping_rules`: entries `pattern=option:value,option:value`, separated by `;` or
    newlines. Example: ``gmail.test=conn:5,rate:300;*.corp.test=rate:60/h,adaptive:off``.

    Patterns, as in the transport map: an exact domain, `*.domain` for its subdomains, or `*` for
    every domain; a domain takes the exact entry, else the longest matching `*.` entry, else `*`.
    Options, each optional (left out: the global default, `shaping_max_connections` and
    `shaping_rate_per_minute`):

    - ``conn:N``: concurrent connections to each MX host of the domain (0: no limit).
    - ``rate:N``: messages per minute to the domain; ``N/s``, ``N/min`` and ``N/h`` also do
      (0: no limit). Each matching domain has its own budget: ``*.corp.test=rate:60`` lets
      a.corp.test and b.corp.test have 60 each.
    - ``burst:N``: messages that may go at once before the rate paces them (default: a tenth
      of the per-minute rate, at least 1).
    - ``adaptive:on|off``: whether throttling replies (421, "too many connections" …) lower
      the domain's limits for a while (default on).

    Raises ValueError naming the bad entry.
    """
    rules: list[Rule] = []
    seen: set[str] = set()
    for item in (part.strip() for part in text.replace("\n", ";").split(";")):
        if not item:
            continue
        pattern, sep, options = (part.strip() for part in item.partition("="))
        if not sep or not pattern or not options:
            raise ValueError(f"shaping rule {item!r} is not domain=option:value,…")
        if pattern != "*":
            wildcard = pattern.startswith("*.")
            try:
                domain = to_ascii_domain(pattern[2:] if wildcard else pattern)
            except ValueError as exc:
                raise ValueError(f"shaping rule {item!r}: {exc}") from None
            pattern = f"*.{domain}" if wildcard else domain
        if pattern in seen:
            raise ValueError(f"shaping rules list {pattern!r} twice")
        seen.add(pattern)
        values: dict[str, object] = {}
        for option in (o.strip() for o in options.split(",")):
            key, sep, value = (p.strip().lower() for p in option.partition(":"))
            if not sep or not value:
                raise ValueError(f"shaping rule {item!r}: option {option!r} is not name:value")
            if key in ("conn", "burst"):
                if not value.isdigit():
                    raise ValueError(f"shaping rule {item!r}: {key} needs a whole number")
                values["connections" if key == "conn" else "burst"] = int(value)
            elif key == "rate":
                match = _RATE.match(value)
                if match is None:
                    raise ValueError(
                        f"shaping rule {item!r}: rate {value!r} is not N, N/s, N/min or N/h"
                    )
                values["rate_per_minute"] = float(match.group(1)) * _PER_MINUTE[match.group(2)]
            elif key == "adaptive":
                if value not in ("on", "off", "yes", "no", "true", "false"):
                    raise ValueError(f"shaping rule {item!r}: adaptive is on or off")
                values["adaptive"] = value in ("on", "yes", "true")
            else:
                raise ValueError(
                    f"shaping rule {item!r}: unknown option {key!r} (conn, rate, burst, adaptive)"
                )
        rules.append(Rule(pattern, **values))  # type: ignore[arg-type]
    return tuple(rules)


def rule_for(rules: Sequence[Rule], domain: str) -> Rule | None:
    """The rule for an A-label `domain`: exact, else the longest `*.` suffix, else `*`."""
    best: Rule | None = None
    everything: Rule | None = None
    for rule in rules:
        if rule.pattern == domain:
            return rule
        if rule.pattern == "*":
            everything = rule
        elif (
            rule.pattern.startswith("*.")
            and domain.endswith(rule.pattern[1:])
            and (best is None or len(rule.pattern) > len(best.pattern))
        ):
            best = rule
    return best or everything


# -- the pure parts: rate and slow-down ------------------------------------------------------


class TokenBucket:
    """A token bucket in its GCRA form (ATM Forum TM 4.0): one "theoretical arrival time"
    instead of a token count, so a caller can book a future slot and be told exactly when.

    `reserve(now)` books the next slot and returns its time (≥ now): `burst` messages go at
    once, then one every 60/rate seconds. Times are seconds on any monotonic clock.
    """

    def __init__(self, rate_per_minute: float, burst: int, now: float) -> None:
        self.rate_per_minute = rate_per_minute
        self.burst = max(1, burst)
        self.tat = now  # the theoretical arrival time; `now`: the whole burst is available

    @property
    def interval(self) -> float:
        return 60.0 / self.rate_per_minute if self.rate_per_minute > 0 else 0.0

    def set_rate(self, rate_per_minute: float, burst: int) -> None:
        """Change the rate; slots already booked stay booked."""
        self.rate_per_minute = rate_per_minute
        self.burst = max(1, burst)

    def next_slot(self, now: float) -> float:
        """When a message could go, without booking it."""
        if self.rate_per_minute <= 0:
            return now
        return max(now, self.tat - (self.burst - 1) * self.interval)

    def reserve(self, now: float) -> float:
        """Book the next slot; returns its time."""
        at = self.next_slot(now)
        if self.rate_per_minute > 0:
            self.tat = max(self.tat, at) + self.interval
        return at

    def drain(self, now: float) -> None:
        """Forget every booking and the burst: the next slot is one interval from `now`."""
        self.tat = now + self.burst * self.interval

    def idle(self, now: float) -> bool:
        """True when nothing is booked (the whole burst is available)."""
        return self.tat <= now


@dataclass
class Slowdown:
    """The adaptive factor of one destination: a throttling reply halves it (at most once per
    `debounce` seconds, never below `floor`); it stays down for `hold` seconds after the last
    such reply, then recovers linearly to 1 over `recover` seconds."""

    hold: float = 600.0
    recover: float = 600.0
    floor: float = SLOWDOWN_FLOOR
    debounce: float = SLOWDOWN_DEBOUNCE
    low: float = 1.0  # the factor at the last slow-down
    last_signal: float | None = None  # monotonic time of the last throttling reply
    lowered_at: float | None = None  # monotonic time of the last slow-down
    reason: str = ""  # what lowered it: "421 4.7.0"
    since: datetime | None = None  # wall-clock time of the last slow-down, for people

    def factor(self, now: float) -> float:
        """The share of the configured limits that applies at `now` (0 < factor ≤ 1)."""
        if self.last_signal is None:
            return 1.0
        elapsed = now - self.last_signal
        if elapsed <= self.hold:
            return self.low
        progress = (elapsed - self.hold) / self.recover if self.recover > 0 else 1.0
        if progress >= 1.0:
            return 1.0
        return self.low + (1.0 - self.low) * progress

    def active(self, now: float) -> bool:
        return self.factor(now) < 1.0

    def signal(self, now: float, reason: str, wall: datetime) -> bool:
        """A throttling reply at `now`: halve the factor unless one did so within `debounce`
        seconds (concurrent connections refused together count once). True when lowered."""
        current = self.factor(now)
        self.last_signal = now  # every signal extends the hold
        if self.lowered_at is not None and now - self.lowered_at < self.debounce:
            self.low = min(self.low, current)
            return False
        self.low = max(self.floor, current / 2)
        self.lowered_at = now
        self.reason, self.since = reason, wall
        return True


# RFC 5321 §3.8 / §4.2.2: 421 is the server closing the channel ("service not available"),
# which receivers use to push back on senders. RFC 3463 §3.5: X.4.5 is mail system congestion.
# The texts are what large receivers write in 4xx replies when they rate-limit a sender.
_THROTTLE_TEXT = re.compile(
    r"too\s+many\s+(?:concurrent\s+|simultaneous\s+|open\s+)?"
    r"(?:connections|sessions|messages|mails|e-?mails|requests|smtp\s+sessions)"
    r"|rate[\s-]?limit|(?:sending|message|connection)\s+rate"
    r"|slow\s+down|throttl|try\s+(?:again\s+)?later",
    re.IGNORECASE,
)
_GREYLISTING = re.compile(r"gr[ae]y-?list", re.IGNORECASE)


def is_throttling(reply: Reply | None) -> bool:
    """Whether a reply asks us to send more slowly: 421, X.4.5 congestion, or a 4xx whose text
    says "too many connections/messages", "rate limit", "slow down" or "try later".
    Greylisting ("greylisted, try again later") is not throttling: it is about the sender
    being new, not too fast."""
    if reply is None or not reply.is_transient:
        return False
    if reply.code == 421 or reply.enhanced_status == "4.4.5":
        return True
    return bool(_THROTTLE_TEXT.search(reply.text)) and not _GREYLISTING.search(reply.text)


# -- the shaper: limits that hold for every sender sharing its state ----------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Why and until when a delivery waits for shaping (recorded as deferred, no attempt)."""

    until: datetime
    reason: str  # for last_reply: "waiting: rate limit for gmail.test (300/min)"
    limit: Literal["rate", "connections"]


@dataclass
class _Held:
    """A connection slot this process holds, and the task renewing its lease."""

    slot: int | None  # None: the host has no connection limit, nothing to give back
    renewer: asyncio.Task[None] | None = None


def _format_rate(per_minute: float) -> str:
    return f"{per_minute:.3g}/min" if per_minute < 10 else f"{per_minute:.0f}/min"


class Shaper:
    """Per-destination limits for the deliveries of every worker that shares `state`.

    With `StoreState` (what workers use) the state is in the store, so the limits hold for the
    whole cluster: N worker processes on any number of nodes together open at most the
    configured connections to an MX host and send at most the configured rate to a domain, and
    a throttling reply seen by one of them slows them all down.

    The rate is a token bucket per recipient domain from which deliveries book slots: a slot
    within `max_wait` seconds is waited for in the worker (`pace`), a later one is released as
    a `Wait` (the delivery goes back to the queue as deferred until its slot, which stays
    booked for it: whichever worker claims it then passes the slot back to `admit` as
    `booked`). Connections are leased slots per MX host (`CONNECTION_LEASE_SECONDS`, renewed
    while the connection is open, so a killed worker's slots free themselves). A throttling
    reply (`is_throttling`) halves the domain's rate and connections for a while (see
    `Slowdown`); slots booked at the old rate are given up and booked again at the new one.

    Staleness: booking slots and recording a throttling reply read and write the current
    state in one transaction. Only the connection limit and what `limits` reports come from a
    copy at most `STATE_STALENESS_SECONDS` old.
    """

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        defaults: Limits | None = None,
        *,
        state: ShapingState | None = None,
        holder: str = "",
        max_wait: float = 5.0,
        slowdown_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
        wallclock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.rules = tuple(rules)
        self.defaults = defaults or Limits(connections=10, rate_per_minute=600)
        self.state: ShapingState = state if state is not None else MemoryState()
        self.holder = holder or worker_name()
        self.max_wait = max(0.0, max_wait)
        self.slowdown_seconds = slowdown_seconds
        self.clock = clock
        self.wallclock = wallclock
        self._copies: dict[str, tuple[float, DestinationRecord | None]] = {}
        self._held: dict[str, list[_Held]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    @classmethod
    def from_settings(
        cls, settings: Settings, store: Store | None = None, holder: str = ""
    ) -> Self:
        """A shaper configured by the `shaping_*` settings, its state in `store` (shared by
        every process) or, without one, in this process. Raises ValueError for bad rules."""
        return cls(
            parse_rules(settings.shaping_rules),
            Limits(settings.shaping_max_connections, float(settings.shaping_rate_per_minute)),
            state=StoreState(store) if store is not None else None,
            holder=holder,
            max_wait=settings.shaping_max_wait_seconds,
            slowdown_seconds=float(settings.shaping_slowdown_seconds),
        )

    # -- state ------------------------------------------------------------------------------

    def configured(self, domain: str) -> Limits:
        """The limits the rules give `domain`, before any slow-down."""
        try:
            name = to_ascii_domain(domain)
        except ValueError:
            return self.defaults
        rule = rule_for(self.rules, name)
        return rule.apply(self.defaults) if rule is not None else self.defaults

    def _slowdown(self, record: DestinationRecord | None) -> Slowdown:
        slowdown = Slowdown(hold=self.slowdown_seconds, recover=self.slowdown_seconds)
        if record is not None:
            slowdown.low, slowdown.last_signal = record.low, record.last_signal
            slowdown.lowered_at, slowdown.reason = record.lowered_at, record.reason
            slowdown.since = record.since
        return slowdown

    @staticmethod
    def _keep(record: DestinationRecord, slowdown: Slowdown) -> None:
        record.low, record.last_signal = slowdown.low, slowdown.last_signal
        record.lowered_at, record.reason = slowdown.lowered_at, slowdown.reason
        record.since = slowdown.since

    def _copy(self, domain: str) -> DestinationRecord | None:
        """The domain's shared record as last seen, read again when older than
        STATE_STALENESS_SECONDS."""
        now = self.clock()
        seen = self._copies.get(domain)
        if seen is None or now - seen[0] > STATE_STALENESS_SECONDS:
            seen = (now, self.state.peek(domain))
            if len(self._copies) > 10_000:  # bounded: many domains, each looked at once
                self._copies.clear()
            self._copies[domain] = seen
        return seen[1]

    def _seen(self, domain: str, record: DestinationRecord) -> None:
        self._copies[domain] = (self.clock(), copy.copy(record))

    def limits(self, domain: str) -> Limits:
        """The limits that apply to `domain` now (lowered while it is slowed down)."""
        slowdown = self._slowdown(self._copy(domain))
        return self.configured(domain).scaled(slowdown.factor(self.clock()))

    def slowed_down(self, domain: str) -> Slowdown | None:
        """The domain's slow-down while one is in effect, else None."""
        slowdown = self._slowdown(self._copy(domain))
        return slowdown if slowdown.active(self.clock()) else None

    # -- rate ---------------------------------------------------------------------------------

    def admit(
        self,
        domain: str,
        keys: Iterable[Hashable],
        booked: Mapping[Hashable, tuple[float, str]] | None = None,
    ) -> tuple[dict[Hashable, float], dict[Hashable, Wait]]:
        """Book a rate slot for each delivery (in order). Returns (slot time on `clock` for
        those that may go within `max_wait`, a Wait for the others). `booked` gives the slot
        and the `Wait.reason` a delivery was released with earlier: it keeps that slot unless
        the destination was slowed down since (the reason names the slow-down in effect when
        the slot was booked). Blocking (a store transaction)."""
        keys = list(keys)
        booked = booked or {}
        configured = self.configured(domain)
        now = self.clock()
        if configured.rate_per_minute <= 0:  # no rate limit: nothing to book
            return dict.fromkeys(keys, now), {}

        def book(record: DestinationRecord) -> tuple[dict[Hashable, float], dict[Hashable, Wait]]:
            slowdown = self._slowdown(record)
            limits = configured.scaled(slowdown.factor(now))
            bucket = TokenBucket(limits.rate_per_minute, limits.effective_burst, record.tat)
            go: dict[Hashable, float] = {}
            waits: dict[Hashable, Wait] = {}
            for key in keys:
                held = booked.get(key)
                if held is not None and self._lowered(slowdown, now) in held[1]:
                    slot = held[0]
                else:
                    slot = bucket.reserve(now)
                if slot - now <= self.max_wait:
                    go[key] = slot
                else:
                    waits[key] = self._rate_wait(domain, limits, slowdown, slot, now)
            record.tat = bucket.tat
            self._seen(domain, record)
            return go, waits

        return self.state.update(domain, now, book)

    def defer(self, domain: str, keys: Iterable[Hashable]) -> dict[Hashable, Wait]:
        """Book a rate slot for each delivery and release every one of them to wait for it
        (after a throttling reply ended the connection they were to go on). Blocking."""
        keys = list(keys)
        configured = self.configured(domain)
        now = self.clock()

        def book(record: DestinationRecord) -> dict[Hashable, Wait]:
            slowdown = self._slowdown(record)
            limits = configured.scaled(slowdown.factor(now))
            bucket = TokenBucket(limits.rate_per_minute, limits.effective_burst, record.tat)
            waits = {
                key: self._rate_wait(domain, limits, slowdown, bucket.reserve(now), now)
                for key in keys
            }
            record.tat = bucket.tat
            self._seen(domain, record)
            return waits

        return self.state.update(domain, now, book)

    def _rate_wait(
        self, domain: str, limits: Limits, slowdown: Slowdown, slot: float, now: float
    ) -> Wait:
        detail = _format_rate(limits.rate_per_minute) + self._lowered(slowdown, now)
        return Wait(self._wall(slot, now), f"waiting: rate limit for {domain} ({detail})", "rate")

    async def pace(self, slot: float) -> None:
        """Wait in the worker until a slot `admit` gave (at most about `max_wait`)."""
        delay = slot - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- connections ----------------------------------------------------------------------

    async def acquire_connection(self, domain: str, host: str) -> bool:
        """A connection slot for `host` under `domain`'s limit, waiting up to `max_wait`
        (looking again when this process gives one back, and every so often for the
        others); False when none freed in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        pause = SLOT_POLL_SECONDS[0]
        while True:
            limit, slot = await asyncio.to_thread(self._take_slot, domain, host)
            if limit <= 0:
                self._held.setdefault(host, []).append(_Held(None))
                return True
            if slot is not None:
                held = _Held(slot)
                held.renewer = asyncio.create_task(self._renew(host, slot))
                self._held.setdefault(host, []).append(held)
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(host, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, min(remaining, pause))
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(host)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
            pause = min(pause * 2, SLOT_POLL_SECONDS[1])

    def _take_slot(self, domain: str, host: str) -> tuple[int, int | None]:
        """(the connection limit now, a slot taken under it or None); no slot is taken when
        the limit is 0 (none). Blocking: the limit and the slot in one trip to a thread."""
        limit = self.limits(domain).connections
        if limit <= 0:
            return limit, None
        slot = self.state.take_slot(
            host, limit, self.holder, self.clock(), CONNECTION_LEASE_SECONDS
        )
        return limit, slot

    async def _renew(self, host: str, slot: int) -> None:
        while True:
            await asyncio.sleep(CONNECTION_LEASE_SECONDS / 3)
            until = self.clock() + CONNECTION_LEASE_SECONDS
            try:
                renewed = await asyncio.to_thread(
                    self.state.renew_slot, host, slot, self.holder, until
                )
            except Exception as exc:  # the store away for a moment: the next turn tries again
                log.warning("renewing connection slot %d of %s failed: %s", slot, host, exc)
                continue
            if not renewed:
                log.warning("connection slot %d of %s was lost (lease ran out)", slot, host)
                return

    async def release_connection(self, host: str) -> None:
        """Give back a slot `acquire_connection` gave for `host`."""
        held_list = self._held.get(host)
        if not held_list:
            return
        held = held_list.pop()
        if not held_list:
            del self._held[host]
        if held.renewer is not None:
            held.renewer.cancel()
        if held.slot is not None:
            await asyncio.to_thread(self.state.free_slot, host, held.slot, self.holder)
        for waiter in self._waiters.pop(host, []):  # each tries again; losers wait again
            if not waiter.done():
                waiter.set_result(None)

    def busy(self, host: str) -> int:
        """Connections to `host` open now, by every sender sharing the state. Blocking."""
        return self.state.busy(host, self.clock())

    def connection_wait(self, domain: str, host: str) -> Wait:
        """The Wait for deliveries that found no free connection to `host` in time."""
        now = self.clock()
        slowdown = self._slowdown(self._copy(domain))
        limit = self.configured(domain).scaled(slowdown.factor(now)).connections
        detail = f"{limit} connection{'s' if limit != 1 else ''} busy"
        detail += self._lowered(slowdown, now)
        return Wait(
            self._wall(now + CONNECTION_RETRY_SECONDS, now),
            f"waiting: connection limit for {host} ({detail})",
            "connections",
        )

    # -- adapting -------------------------------------------------------------------------

    def throttled(self, domain: str, reply: Reply) -> bool:
        """Tell the shaper a remote answered `domain`'s mail with a throttling reply; True when
        that lowered the domain's limits (False: adaptive off, or lowered moments ago, here or
        by another worker). Blocking."""
        configured = self.configured(domain)
        if not configured.adaptive:
            return False
        now = self.clock()
        wall = self.wallclock()
        reason = " ".join(str(p) for p in (reply.code, reply.enhanced_status) if p)

        def signal(record: DestinationRecord) -> Limits | None:
            slowdown = self._slowdown(record)
            lowered = slowdown.signal(now, reason, wall)
            self._keep(record, slowdown)
            limits = configured.scaled(slowdown.factor(now))
            if lowered:
                # Slow down now: slots booked at the old rate are given up (their deliveries
                # book again when they come back) and the burst is spent.
                bucket = TokenBucket(limits.rate_per_minute, limits.effective_burst, record.tat)
                bucket.drain(now)
                record.tat = bucket.tat
            self._seen(domain, record)
            return limits if lowered else None

        limits = self.state.update(domain, now, signal)
        if limits is None:
            return False
        # Here, not at the top: checking the settings loads this module before the metrics
        # directory is chosen (see metrics_dir.py).
        from postbode.metrics import SHAPING_SLOWDOWNS

        SHAPING_SLOWDOWNS.labels(domain).inc()
        log.warning(
            "slowing %s down to %s and %d connections per MX host after %r",
            domain,
            _format_rate(limits.rate_per_minute),
            limits.connections,
            str(reply),
        )
        return True

    def _lowered(self, slowdown: Slowdown, now: float) -> str:
        if not slowdown.active(now) or slowdown.since is None:
            return ""
        return f", lowered after {slowdown.reason} at {slowdown.since:%H:%M:%S} UTC"

    def _wall(self, at: float, now: float) -> datetime:
        return self.wallclock() + timedelta(seconds=max(0.0, at - now))
