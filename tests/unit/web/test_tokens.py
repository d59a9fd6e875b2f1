"""Signed values and CSRF tokens (pure)."""

from __future__ import annotations

from postbode.web.ui import tokens
from postbode.web.ui.core import duration, safe_next

KEY = tokens.derive_key(b"secret", "session")


def test_a_signed_value_round_trips_until_it_expires() -> None:
    value = tokens.sign(KEY, {"u": 1, "n": "abc"}, now=1000.0)
    assert tokens.unsign(KEY, value, max_age=60, now=1030.0) == {"u": 1, "n": "abc", "iat": 1000}
    assert tokens.unsign(KEY, value, max_age=60, now=1061.0) is None
    assert tokens.unsign(KEY, value, max_age=60, now=900.0) is None  # from the future


def test_tampering_or_another_key_or_purpose_fails() -> None:
    value = tokens.sign(KEY, {"u": 1}, now=1000.0)
    body, mac = value.split(".")
    forged = tokens.sign(KEY, {"u": 2}, now=1000.0).split(".")[0]
    assert tokens.unsign(KEY, f"{forged}.{mac}", 60, 1000.0) is None
    other = tokens.derive_key(b"secret", "flash")
    assert tokens.unsign(other, value, 60, 1000.0) is None
    for junk in (None, "", "x", "a.b.c", "!!!.???", body, "." * 10, "a" * 5000 + ".b"):
        assert tokens.unsign(KEY, junk, 60, 1000.0) is None


def test_csrf_tokens_are_bound_to_their_session() -> None:
    key = tokens.derive_key(b"secret", "csrf")
    mine, theirs = tokens.new_nonce(), tokens.new_nonce()
    token = tokens.csrf_token(key, mine)
    assert tokens.csrf_ok(key, mine, token)
    assert not tokens.csrf_ok(key, theirs, token)
    assert not tokens.csrf_ok(key, mine, None) and not tokens.csrf_ok(key, "", token)
    assert not tokens.csrf_ok(key, mine, token + "x")


def test_fingerprints_change_with_the_password_hash() -> None:
    assert tokens.fingerprint("$argon2id$a") != tokens.fingerprint("$argon2id$b")
    assert len(tokens.fingerprint("x")) == 16


def test_helpers() -> None:
    assert [duration(s) for s in (5, 600, 3600, 3660, 90000, 86400)] == [
        "5 s",
        "10 min",
        "1 h",
        "1 h 1 min",
        "1 d 1 h",
        "1 d",
    ]
    assert safe_next("/queue?app=shop") == "/queue?app=shop"
    assert safe_next("//evil.test") == "/" and safe_next("https://evil.test") == "/"
    assert safe_next(None) == "/"
