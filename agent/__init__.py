"""ktrace agent: makes the real DNS lookups and connections where it runs (a pod)."""

from . import tuning as _tuning  # noqa: F401  # before anything imports grpc

__version__ = "0.1.0"
