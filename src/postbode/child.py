"""`python -m postbode.child worker|listen`: how `postbode serve` starts its worker and
listener processes. The same as `postbode worker` / `postbode listen`, without the command line's
libraries (typer, rich): each child loads only what its roles use."""

from __future__ import annotations

import os
import sys

from postbode.config import get_settings
from postbode.metrics_dir import METRICS_ID_ENV, use_node_directory
from postbode.preflight import BadSetting, check, read


def main(argv: list[str]) -> int:
    try:
        check(settings := read())
    except BadSetting as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    directory = use_node_directory(settings.data_dir, fresh=False)  # the one `serve` emptied
    name = os.environ.get(METRICS_ID_ENV)
    if directory is not None and name:
        from prometheus_client import values

        # Before any metric exists: this process counts under its slot's name (roles.py).
        values.ValueClass = values.MultiProcessValue(lambda: name)  # type: ignore[no-untyped-call]

    from postbode.roles import available_roles, configure_logging, start
    from postbode.store.engine import create_store

    # A worker process started for a burst of mail runs the queues only and leaves when idle.
    kinds = {
        "worker": ["queues"] if settings.worker_idle_seconds > 0 else ["worker"],
        "listen": ["web", "smtp"],
    }
    if len(argv) != 1 or argv[0] not in kinds:
        sys.stderr.write("usage: python -m postbode.child worker|listen\n")
        return 2
    roles = kinds[argv[0]]
    assert set(roles) <= set(available_roles())
    configure_logging(settings)
    try:
        # `serve` has migrated and analysed the store (on SQLite) before starting this process.
        store = create_store(get_settings(), migrate=False, analyze=False)
    except Exception as exc:  # database down, schema mismatch: one clear line
        sys.stderr.write(f"error: cannot open the store: {exc}\n")
        return 2
    start(get_settings(), store, roles)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
