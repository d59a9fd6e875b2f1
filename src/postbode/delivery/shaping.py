"""Traffic shaping per destination: MX connections, messages per minute, adaptive slow-down."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, Self

from postbode.delivery.mx import to_ascii_domain
from postbode.delivery.outcomes import Reply
from postbode.metrics import SHAPING_SLOWDOWNS
from postbode.store.schema import utcnow

if TYPE_CHECKING:
    from postbode.config import Settings

__all__ = [
    "ConnectionSlots",
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
RESERVATION_GRACE = 600.0  # seconds a slot stays booked for a delivery that has not come back
IDLE_FORGET = 3600.0  # seconds after which an idle destination's state is forgotten


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
        self._tat = now  # an empty schedule: the whole burst is available

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
        return max(now, self._tat - (self.burst - 1) * self.interval)

    def reserve(self, now: float) -> float:
        """Book the next slot; returns its time."""
        at = self.next_slot(now)
        if self.rate_per_minute > 0:
            self._tat = max(self._tat, at) + self.interval
        return at

    def drain(self, now: float) -> None:
        """Forget every booking and the burst: the next slot is one interval from `now`."""
        self._tat = now + self.burst * self.interval

    def idle(self, now: float) -> bool:
        """True when nothing is booked (the whole burst is available)."""
        return self._tat <= now


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


# -- connection slots ------------------------------------------------------------------------


class ConnectionSlots:
    """Counts open connections per MX host; `acquire` waits (on the running loop) for one."""

    def __init__(self) -> None:
        self._busy: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def busy(self, host: str) -> int:
        return self._busy.get(host, 0)

    def try_acquire(self, host: str, limit: int) -> bool:
        if limit > 0 and self._busy.get(host, 0) >= limit:
            return False
        self._busy[host] = self._busy.get(host, 0) + 1
        return True

    def release(self, host: str) -> None:
        count = self._busy.get(host, 0) - 1
        if count > 0:
            self._busy[host] = count
        else:
            self._busy.pop(host, None)
        for waiter in self._waiters.pop(host, []):  # each tries again; losers wait again
            if not waiter.done():
                waiter.set_result(None)

    async def acquire(self, host: str, limit: Callable[[], int], timeout: float) -> bool:
        """A slot for `host` under `limit()` (asked again after each wake-up, as adaptive
        limits change), waiting up to `timeout` seconds; False when none freed in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.try_acquire(host, limit()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(host, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                waiters = self._waiters.get(host)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
        return True


# -- the shaper: one per worker process --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Why and until when a delivery waits for shaping (recorded as deferred, no attempt)."""

    until: datetime
    reason: str  # for last_reply: "waiting: rate limit for gmail.test (300/min)"
    limit: Literal["rate", "connections"]


@dataclass
class _Destination:
    """What the shaper keeps per recipient domain."""

    limits: Limits
    bucket: TokenBucket
    slowdown: Slowdown
    reservations: dict[Hashable, float] = field(default_factory=dict)  # delivery id -> slot
    used_at: float = 0.0


def _format_rate(per_minute: float) -> str:
    return f"{per_minute:.3g}/min" if per_minute < 10 else f"{per_minute:.0f}/min"


class Shaper:
    """Per-destination limits for the deliveries of one worker process.

    The state is in memory: every worker process shapes its own traffic, so with N worker
    processes (on one machine or many) a destination sees up to N times the configured
    connections and rate, and a slow-down learnt by one process is not known to the others.
    Configure the limits per process accordingly.

    The rate is a token bucket per recipient domain from which deliveries book slots: a slot
    within `max_wait` seconds is waited for in the worker (`pace`), a later one is released as
    a `Wait` (the delivery goes back to the queue as deferred until its slot, which stays
    booked for it). Connections are counted per MX host. A throttling reply (`is_throttling`)
    halves the domain's rate and connections for a while (see `Slowdown`); slots booked at the
    old rate are given up and booked again at the new one when their deliveries come back.
    """

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        defaults: Limits | None = None,
        *,
        max_wait: float = 5.0,
        slowdown_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.rules = tuple(rules)
        self.defaults = defaults or Limits(connections=10, rate_per_minute=600)
        self.max_wait = max(0.0, max_wait)
        self.slowdown_seconds = slowdown_seconds
        self.clock = clock
        self.wallclock = wallclock
        self.connections = ConnectionSlots()
        self._destinations: dict[str, _Destination] = {}
        self._last_purge = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """A shaper configured by the `shaping_*` settings (raises ValueError for bad rules)."""
        return cls(
            parse_rules(settings.shaping_rules),
            Limits(settings.shaping_max_connections, float(settings.shaping_rate_per_minute)),
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

    def _destination(self, domain: str) -> _Destination:
        now = self.clock()
        dest = self._destinations.get(domain)
        if dest is None:
            limits = self.configured(domain)
            dest = _Destination(
                limits,
                TokenBucket(limits.rate_per_minute, limits.effective_burst, now),
                Slowdown(hold=self.slowdown_seconds, recover=self.slowdown_seconds),
            )
            self._destinations[domain] = dest
        dest.used_at = now
        if now - self._last_purge > 60.0:
            self._purge(now)
        return dest

    def _purge(self, now: float) -> None:
        self._last_purge = now
        for domain, dest in list(self._destinations.items()):
            for key, slot in list(dest.reservations.items()):
                if slot < now - RESERVATION_GRACE:  # never came back (cancelled, other worker)
                    del dest.reservations[key]
            if (
                now - dest.used_at > IDLE_FORGET
                and not dest.reservations
                and not dest.slowdown.active(now)
                and dest.bucket.idle(now)
            ):
                del self._destinations[domain]

    def limits(self, domain: str) -> Limits:
        """The limits that apply to `domain` now (lowered while it is slowed down)."""
        dest = self._destination(domain)
        return dest.limits.scaled(dest.slowdown.factor(self.clock()))

    def slowed_down(self, domain: str) -> Slowdown | None:
        """The domain's slow-down while one is in effect, else None."""
        dest = self._destinations.get(domain)
        if dest is None or not dest.slowdown.active(self.clock()):
            return None
        return dest.slowdown

    # -- rate ---------------------------------------------------------------------------------

    def admit(
        self, domain: str, keys: Iterable[Hashable]
    ) -> tuple[dict[Hashable, float], dict[Hashable, Wait]]:
        """Book a rate slot for each delivery (in order). Returns (slot time on `clock` for
        those that may go within `max_wait`, a Wait for the others). A delivery that booked a
        slot earlier keeps it."""
        dest = self._destination(domain)
        now = self.clock()
        limits = self._sync_rate(dest, now)
        go: dict[Hashable, float] = {}
        waits: dict[Hashable, Wait] = {}
        for key in keys:
            slot = dest.reservations.pop(key, None)
            if slot is None:
                slot = dest.bucket.reserve(now)
            if slot - now <= self.max_wait:
                go[key] = slot
            else:
                dest.reservations[key] = slot
                waits[key] = self._rate_wait(domain, dest, limits, slot, now)
        return go, waits

    def defer(self, domain: str, keys: Iterable[Hashable]) -> dict[Hashable, Wait]:
        """Book a rate slot for each delivery and release every one of them to wait for it
        (after a throttling reply ended the connection they were to go on)."""
        dest = self._destination(domain)
        now = self.clock()
        limits = self._sync_rate(dest, now)
        waits: dict[Hashable, Wait] = {}
        for key in keys:
            slot = dest.reservations.pop(key, None)
            if slot is None:
                slot = dest.bucket.reserve(now)
            dest.reservations[key] = slot
            waits[key] = self._rate_wait(domain, dest, limits, slot, now)
        return waits

    def _sync_rate(self, dest: _Destination, now: float) -> Limits:
        limits = dest.limits.scaled(dest.slowdown.factor(now))
        dest.bucket.set_rate(limits.rate_per_minute, limits.effective_burst)
        return limits

    def _rate_wait(
        self, domain: str, dest: _Destination, limits: Limits, slot: float, now: float
    ) -> Wait:
        detail = _format_rate(limits.rate_per_minute)
        detail += self._lowered(dest, now)
        return Wait(self._wall(slot, now), f"waiting: rate limit for {domain} ({detail})", "rate")

    async def pace(self, slot: float) -> None:
        """Wait in the worker until a slot `admit` gave (at most about `max_wait`)."""
        delay = slot - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- connections ----------------------------------------------------------------------

    async def acquire_connection(self, domain: str, host: str) -> bool:
        """A connection slot for `host` under `domain`'s limit, waiting up to `max_wait`."""
        return await self.connections.acquire(
            host, lambda: self.limits(domain).connections, self.max_wait
        )

    def release_connection(self, host: str) -> None:
        self.connections.release(host)

    def connection_wait(self, domain: str, host: str) -> Wait:
        """The Wait for deliveries that found no free connection to `host` in time."""
        dest = self._destination(domain)
        now = self.clock()
        limit = dest.limits.scaled(dest.slowdown.factor(now)).connections
        detail = f"{limit} connection{'s' if limit != 1 else ''} busy" + self._lowered(dest, now)
        return Wait(
            self._wall(now + CONNECTION_RETRY_SECONDS, now),
            f"waiting: connection limit for {host} ({detail})",
            "connections",
        )

    # -- adapting -------------------------------------------------------------------------

    def throttled(self, domain: str, reply: Reply) -> bool:
        """Tell the shaper a remote answered `domain`'s mail with a throttling reply; True when
        that lowered the domain's limits (False: adaptive off, or lowered moments ago)."""
        dest = self._destination(domain)
        if not dest.limits.adaptive:
            return False
        now = self.clock()
        reason = " ".join(str(p) for p in (reply.code, reply.enhanced_status) if p)
        if not dest.slowdown.signal(now, reason, self.wallclock()):
            return False
        # Slow down now: slots booked at the old rate are given up (their deliveries book
        # again when they come back) and the burst is spent.
        dest.reservations.clear()
        self._sync_rate(dest, now)
        dest.bucket.drain(now)
        SHAPING_SLOWDOWNS.labels(domain).inc()
        limits = dest.limits.scaled(dest.slowdown.factor(now))
        log.warning(
            "slowing %s down to %s and %d connections per MX host after %r",
            domain,
            _format_rate(limits.rate_per_minute),
            limits.connections,
            str(reply),
        )
        return True

    def _lowered(self, dest: _Destination, now: float) -> str:
        slowdown = dest.slowdown
        if not slowdown.active(now) or slowdown.since is None:
            return ""
        return f", lowered after {slowdown.reason} at {slowdown.since:%H:%M} UTC"

    def _wall(self, at: float, now: float) -> datetime:
        return self.wallclock() + timedelta(seconds=max(0.0, at - now))
