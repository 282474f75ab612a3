"""ktrace agent: makes the real DNS lookups and connections where it runs (a pod)."""

__version__ = "0.1.0"
