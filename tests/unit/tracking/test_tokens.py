"""Tracking tokens: round trips, and nothing forged, altered or of another kind gets through."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postbode.tracking import tokens
from postbode.tracking.tokens import Token

KEY = tokens.derive_key(b"installation secret")
DELIVERY = uuid.UUID("01905d2e-0000-7000-8000-00000000abcd")


def test_round_trips() -> None:
    click = Token("click", DELIVERY, "https://shop.test/orders/42?utm=mail&x=é#top", 3, 7)
    for token in (click, Token("open", DELIVERY), Token("unsubscribe", DELIVERY)):
        text = tokens.encode(token, KEY)
        assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert tokens.decode(text, KEY) == token
        assert tokens.decode(text, KEY, token.kind) == token


def test_compact_and_at_least_128_bit_mac() -> None:
    assert tokens.MAC_BYTES * 8 >= 128
    url = "https://shop.test/a"
    text = tokens.encode(Token("click", DELIVERY, url), KEY)
    # version, kind, 16-byte id, 4 bytes of link numbers, the URL, the MAC: nothing else
    assert len(base64.urlsafe_b64decode(text + "==")) == 1 + 1 + 16 + 4 + len(url) + 16
    assert len(tokens.encode(Token("open", DELIVERY), KEY)) == 46


def test_kind_must_match() -> None:
    text = tokens.encode(Token("open", DELIVERY), KEY)
    assert tokens.decode(text, KEY, "click") is None
    assert tokens.decode(text, KEY, "unsubscribe") is None


def test_another_key_fails() -> None:
    text = tokens.encode(Token("click", DELIVERY, "https://shop.test/"), KEY)
    assert tokens.decode(text, tokens.derive_key(b"another installation")) is None


@pytest.mark.parametrize(
    "text",
    ["", "!!!!", "A" * 10, "A" * (tokens.MAX_TOKEN_LENGTH + 1), "AQ", "====", "ü"],
)
def test_garbage_is_refused(text: str) -> None:
    assert tokens.decode(text, KEY) is None


def test_a_url_swapped_in_is_refused() -> None:
    raw = bytearray(
        base64.urlsafe_b64decode(
            tokens.encode(Token("click", DELIVERY, "https://shop.test/"), KEY) + "=="
        )
    )
    raw[22:39] = b"https://evil.tes/"  # same length, another host
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert tokens.decode(forged, KEY) is None


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0))
def test_any_flipped_bit_is_refused(url_tail: bytes, position: int) -> None:
    url = "https://shop.test/" + url_tail.hex()
    raw = bytearray(
        base64.urlsafe_b64decode(tokens.encode(Token("click", DELIVERY, url), KEY) + "==")
    )
    raw[position % len(raw)] ^= 1 << (position % 8)
    assert tokens.decode(base64.urlsafe_b64encode(bytes(raw)).decode(), KEY) is None


def test_a_click_token_needs_a_url() -> None:
    with pytest.raises(ValueError):
        tokens.encode(Token("click", DELIVERY), KEY)
