"""Where one node's processes keep their metrics: a directory they share, so that any web
process's /metrics reports the whole node (prometheus-client's multiprocess mode).

Must run before prometheus-client is first imported (it reads PROMETHEUS_MULTIPROC_DIR then):
the command line calls it before anything else of Postbode is loaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker process of `postbode serve` is named in the directory by its slot (`worker0` …), not
# its pid: worker processes that come and go reuse their slot's files instead of adding files
# for good (the counters of ended processes must keep counting) until serve restarts.
METRICS_ID_ENV = "POSTBODE_METRICS_ID"


def use_node_directory(data_dir: Path, *, fresh: bool) -> Path | None:
    """Point this process (and the children it starts) at the node's metrics directory:
    PROMETHEUS_MULTIPROC_DIR when the operator set it (e.g. a tmpfs), else `metrics/` in the
    data directory. `fresh` (the process that starts a node's others, `postbode serve`)
    empties it first: counts start again with the node. Returns the directory, or None when
    it is too late (prometheus-client is already loaded: metrics stay per process)."""
    if "prometheus_client" in sys.modules and not os.environ.get(ENV):
        return None
    directory = Path(os.environ.get(ENV) or data_dir / "metrics")
    directory.mkdir(parents=True, exist_ok=True)
    if fresh:
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    return directory
