"""INSERTs of many rows whose parameters are made ready for the driver before the transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, Table, insert
from sqlalchemy.sql.dml import Insert


@dataclass(frozen=True)
class PreparedRows:
    """An INSERT statement in the driver's words and its rows in the driver's values."""

    sql: str
    params: list[Any]


@dataclass(frozen=True)
class _Plan:
    sql: str
    keys: tuple[str, ...]  # in the statement's parameter order
    convert: tuple[Callable[[Any], Any] | None, ...]  # SQLAlchemy's bind processor per key
    defaults: tuple[tuple[str, Any], ...]  # (key, ColumnDefault) for keys rows may leave out
    positional: bool


class BulkInsert:
    """`insert(table)` of many rows, in two steps: `prepare` does what SQLAlchemy does to each
    row's values (Python-side column defaults, then the types' bind processing: UUIDs,
    datetimes, JSON) outside any transaction; `execute` hands the result to the driver's
    executemany. On SQLite the write lock is held only for the second step, which is the point.

    As with SQLAlchemy's executemany, the first row's keys name the columns: every row must give
    them, and columns none gives get their Python or server default. `statement`: an INSERT
    into `table` of another form (an upsert) instead of the plain one."""

    def __init__(self, table: Table, statement: Insert | None = None) -> None:
        self.table = table
        self.statement = statement if statement is not None else insert(table)
        self._plans: dict[tuple[str, frozenset[str]], _Plan] = {}

    def _plan(self, dialect: Dialect, given: frozenset[str]) -> _Plan:
        plan = self._plans.get((dialect.name, given))
        if plan is None:
            defaults = tuple(
                (c.key, c.default)
                for c in self.table.columns
                if c.default is not None and c.key not in given
            )
            named = [c.key for c in self.table.columns if c.key in given or c.default is not None]
            compiled = self.statement.compile(dialect=dialect, column_keys=named)
            keys = tuple(compiled.positiontup or named)
            plan = _Plan(
                sql=compiled.string,
                keys=keys,
                convert=tuple(
                    self.table.c[k].type.dialect_impl(dialect).bind_processor(dialect) for k in keys
                ),
                defaults=defaults,
                positional=compiled.positiontup is not None,
            )
            self._plans[(dialect.name, given)] = plan
        return plan

    def prepare(self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> PreparedRows:
        if not rows:
            return PreparedRows("", [])
        plan = self._plan(dialect, frozenset(rows[0]))
        params: list[Any] = []
        for row in rows:
            values = dict(row)
            for key, default in plan.defaults:
                values[key] = default.arg(None) if default.is_callable else default.arg
            converted = tuple(
                values[k] if convert is None else convert(values[k])
                for k, convert in zip(plan.keys, plan.convert, strict=True)
            )
            params.append(
                converted if plan.positional else dict(zip(plan.keys, converted, strict=True))
            )
        return PreparedRows(plan.sql, params)

    @staticmethod
    def execute(conn: Connection, prepared: PreparedRows) -> None:
        if prepared.params:
            conn.exec_driver_sql(prepared.sql, prepared.params)
