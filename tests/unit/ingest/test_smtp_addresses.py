"""Which envelope addresses the SMTP listener stores (RFC 5321 §4.5.3.1, RFC 6531)."""

from __future__ import annotations

import pytest

from postbode.ingest.smtp_server import _storable_address


@pytest.mark.parametrize("code", [*range(0x20), 0x7F])
def test_no_control_character_anywhere(code: int) -> None:
    assert not _storable_address(f"a{chr(code)}b@dest.test")
    assert not _storable_address(f"ab@dest.test{chr(code)}")


def test_printable_ascii_utf8_and_lengths() -> None:
    assert _storable_address("user+tag@dest.test")
    assert _storable_address("jörg@bücher.test")  # RFC 6531: UTF-8 is allowed
    assert _storable_address(" ~@dest.test")  # space and tilde are printable
    assert _storable_address("a" * 310 + "@dest.test")
    assert not _storable_address("a" * 311 + "@dest.test")  # RFC 5321 §4.5.3.1: 320 in all
    assert not _storable_address("a\udcffb@dest.test")  # a byte that was not UTF-8
