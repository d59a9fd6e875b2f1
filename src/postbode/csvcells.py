"""CSV cells that spreadsheets will not run as formulas (OWASP: CSV injection)."""

from __future__ import annotations

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """The value as an exported cell: a leading formula character gets a quote before it."""
    return "'" + value if value[:1] in _FORMULA_STARTS else value


def from_csv_cell(value: str) -> str:
    """An imported cell as the value it stands for (the reverse of csv_cell)."""
    return value[1:] if value[:1] == "'" and value[1:2] in _FORMULA_STARTS else value
