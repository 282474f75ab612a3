"""ktrace agent: makes the real DNS lookups and connections where it runs (a pod)."""

from ktrace_version import __version__ as __version__

from .wire import tuning as _tuning  # noqa: F401  # before anything imports grpc
