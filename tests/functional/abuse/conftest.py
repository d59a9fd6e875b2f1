"""What the abuse tests add to the functional tests' peers (tests/functional/conftest.py)."""

from __future__ import annotations

import pytest

from postbode.store.engine import Store


@pytest.fixture(autouse=True)
def _no_earlier_release(store: Store) -> None:
    """The store is emptied between tests but for system values, where a release is remembered
    by app id: an app of an earlier test with the same id must not have been released."""
    from sqlalchemy import delete

    from postbode.store.schema import system_values

    with store.write() as conn:
        conn.execute(delete(system_values).where(system_values.c.name.like("abuse.%")))
