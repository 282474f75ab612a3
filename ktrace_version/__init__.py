"""The version of the ktrace distribution: the one place a release changes.

Both top-level packages re-export it (ktrace.__version__, ktrace_agent.__version__); the agent image
keeps this package while it drops the laptop half (ktrace/), so the agent reports the same version.
(A package rather than a module: pip --target would not merge a second top-level __pycache__/ into
the agent image's.)
"""

__version__ = "0.1.0"
