"""Who holds a lease: a name unique to one process on one machine."""

from __future__ import annotations

import os
import secrets
import socket


def worker_name() -> str:
    """A lease owner name unique to this process (host, pid and a random part, so a recycled
    pid on another boot never inherits a dead process's leases)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
