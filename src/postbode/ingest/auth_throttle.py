"""Failed SMTP AUTH attempts, counted in the store (so by every process on every node) per
client address, per user name and in all; checked before any password is hashed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select

from postbode import tenancy
from postbode.config import Settings
from postbode.store.engine import Store
from postbode.store.schema import login_attempts

WINDOW = 600.0  # seconds over which failures are counted
MAX_KEY = 400  # login_attempts.key


@dataclass(frozen=True)
class Outcome:
    """What an AUTH attempt came to: the app it logged in as, or a refusal (an SMTP reply)."""

    app_id: int | None = None
    refusal: str | None = None
    close: bool = False  # hang up after the refusal


IP_BLOCKED = Outcome(
    refusal="421 4.7.0 Too many failed authentication attempts, try later", close=True
)
# RFC 4954 §6: 454 4.7.0 temporary authentication failure. The same for every user name,
# known or not.
USER_BLOCKED = Outcome(refusal="454 4.7.0 Too many failed attempts for this user, try later")
ALL_BLOCKED = Outcome(refusal="454 4.7.0 Temporary authentication failure, try later")
FAILED = Outcome(refusal="535 5.7.8 Authentication credentials invalid")


class AuthThrottle:
    """Past `smtp_auth_max_failures` failures from one address in WINDOW, the address is
    turned away; past `smtp_auth_max_failures_per_user` for one user name, or
    `smtp_auth_max_failures_total` in all, attempts are refused before hashing, except with a
    password verified lately (which costs no hash and is no guess)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.per_ip = settings.smtp_auth_max_failures
        self.per_user = settings.smtp_auth_max_failures_per_user
        self.total = settings.smtp_auth_max_failures_total

    @staticmethod
    def keys(ip: str, username: str) -> tuple[str, str, str]:
        return (f"smtp-ip:{ip}"[:MAX_KEY], f"smtp-user:{username}"[:MAX_KEY], "smtp-all")

    def ip_blocked(self, ip: str) -> bool:
        """Whether this client address is over its limit (checked before AUTH is read)."""
        return self._failures(self.keys(ip, "")[0], self.per_ip, time.time()) >= self.per_ip

    def login(self, ip: str, username: str, password: str) -> Outcome:
        """Check, then log in (blocking: run it in a thread)."""
        now = time.time()
        ip_key, user_key, all_key = self.keys(ip, username)
        if self._failures(ip_key, self.per_ip, now) >= self.per_ip:
            return IP_BLOCKED
        throttled = None
        if self._failures(user_key, self.per_user, now) >= self.per_user:
            throttled = USER_BLOCKED
        elif self._failures(all_key, self.total, now) >= self.total:
            throttled = ALL_BLOCKED
        try:
            app_id = tenancy.authenticate_smtp(
                self.store, username, password, may_hash=throttled is None
            )
        except tenancy.NeedsHashing:
            assert throttled is not None
            return throttled
        if app_id is not None:
            return Outcome(app_id=app_id)
        self._fail((ip_key, user_key, all_key), now)
        return FAILED

    def _failures(self, key: str, most: int, now: float) -> int:
        """Failures counted under `key` in the window (counting stops at `most`)."""
        recent = (
            select(login_attempts.c.id)
            .where(login_attempts.c.key == key, login_attempts.c.at > now - WINDOW)
            .limit(most)
            .subquery()
        )
        with self.store.read() as conn:
            return int(conn.execute(select(func.count()).select_from(recent)).scalar_one())

    def _fail(self, keys: tuple[str, ...], now: float) -> None:
        with self.store.write() as conn:
            conn.execute(insert(login_attempts), [{"key": key, "at": now} for key in keys])
            conn.execute(
                delete(login_attempts).where(
                    login_attempts.c.key.in_(keys), login_attempts.c.at <= now - WINDOW
                )
            )
