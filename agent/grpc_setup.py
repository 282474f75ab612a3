"""Process-wide gRPC core settings, made before any channel or server exists.

gRPC core reads ``GRPC_EXPERIMENTS`` from the environment once. With grpcio 1.85 the
EventEngine-based client and listener endpoints cost ktrace's tunnel about 40 % more
per message than the endpoints they replace: measured on a 2-core VM, a stream
message round trip between two Python processes takes ~180 µs instead of ~280 µs, a
redirected connect → first byte 1.4 ms instead of 2.0 ms, bulk throughput ~25 % more
(docs/performance.md). Every message of the tunnel pays this, so ktrace and the agent
turn those two experiments off, but only on grpcio versions where that was measured
(a later version may drop them) and never over a value the user set.

Imported for its effect by ``ktrace_agent`` and ``ktrace.tunnel`` before they import grpc.
``ADDED`` is what was put into ``os.environ``: ``ktrace run`` leaves it out of the traced
program's environment, which must stay the user's.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

EXPERIMENTS_OFF = "-event_engine_client,-event_engine_listener"
MEASURED_VERSIONS = ("1.85.",)


def grpc_version() -> str | None:
    """grpcio's version without importing grpc (importlib.metadata costs ~30 ms)."""
    try:
        spec = importlib.util.find_spec("grpc")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    try:
        text = pathlib.Path(spec.origin).with_name("_grpcio_metadata.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]+([^'\"]+)", text)
    return m.group(1) if m else None


def apply(environ: dict[str, str] | os._Environ[str], version: str | None) -> dict[str, str]:
    """Set what is missing in ``environ``; returns what was added."""
    if version is None or not version.startswith(MEASURED_VERSIONS) or "GRPC_EXPERIMENTS" in environ:
        return {}
    environ["GRPC_EXPERIMENTS"] = EXPERIMENTS_OFF
    return {"GRPC_EXPERIMENTS": EXPERIMENTS_OFF}


ADDED: dict[str, str] = apply(os.environ, grpc_version())
