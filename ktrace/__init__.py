"""ktrace: run a local program with a Kubernetes cluster's network view (docs/architecture.md)."""

from ktrace_version import __version__ as __version__
