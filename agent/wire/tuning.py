"""Process-wide settings for the tunnel's hot path, made before any channel or server exists.

gRPC
----

gRPC core reads ``GRPC_EXPERIMENTS`` from the environment once. With grpcio 1.85 the
EventEngine-based client and listener endpoints make every message of the tunnel dearer than
the endpoints they replace (round trip, connect → first byte and bulk throughput alike:
docs/performance.md, "What the profiles showed", item 3), so ktrace and the agent turn those
two experiments off, but only on grpcio versions where that was measured (a later version may
drop them) and never over a value the user set.

``ADDED`` is what was put into ``os.environ``: ``ktrace run`` leaves it out of the traced
program's environment, which must stay the user's.

malloc
------
Every data frame allocates and frees buffers of up to 1 MiB (socket reads, protobuf
messages, gRPC slices). glibc serves those with mmap/munmap or returns them to the
kernel at once, so each one page-faults 256 zeroed pages back in: perf showed a quarter
of ktrace's and the agent's CPU time in page faults during bulk transfers. Keeping such
blocks on the heap (mmap threshold above the frame size, a trim threshold that keeps a
few frames' worth of free memory) removes that; bounded, so RSS grows by at most
``TRIM_THRESHOLD``.

Giving memory back
------------------
With those thresholds glibc returns freed heap memory to the kernel only when 32 MiB are free
at the top of the heap, and never what is free below a block still in use. After a burst (many
calls rejected at once, a thousand connections that closed) the memory is free but resident, and
more bursts only add to it (docs/performance.md, "Memory over a long run"). ``Trimmer``
collects cyclic garbage and calls ``malloc_trim(0)`` once the process has been quiet for a few
seconds (the owner pokes it on activity), which gives back every free page; a busy process is
never trimmed.

Garbage collector
-----------------
Every stop, frame and datagram allocates short-lived objects (protobuf messages, asyncio
handles and futures). With CPython's default generation-0 threshold (700 allocations) ktrace
collected every few lookups of a glibc ``getaddrinfo`` and traversed all its start-up objects in
each full collection, on the event loop that every stop and frame waits for (docs/performance.md,
"What the profiles showed": the collector's share before and after). ``tune_gc`` freezes what
exists at start-up (modules, classes: never garbage) out of the collector's sight and collects
generation 0 every 20,000 allocations. Cyclic garbage waits a little longer to be freed;
reference counting still frees everything else at once.

Imported for its effect by ``ktrace_agent`` and ``ktrace.tunnel`` before they import grpc.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import importlib.util
import os
import pathlib
import re
import resource
from collections.abc import Callable
from typing import Any

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

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024


def _glibc_function(name: str, argtypes: tuple[type, ...]) -> Any:
    """A glibc function with its C int result, or None elsewhere (musl has no mallopt)."""
    try:
        function = getattr(_LIBC, name) if _LIBC is not None else None
    except AttributeError:
        return None
    if function is not None:
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return function


def _load_libc() -> ctypes.CDLL | None:
    try:  # find_library runs ldconfig: once per process, not once per function
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()
_MALLOPT = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))


def tune_malloc() -> bool:
    """Keep frame-sized blocks on the heap (glibc only; False elsewhere)."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


tune_malloc()


def one_malloc_arena() -> bool:
    """Every thread allocates from the main arena (glibc only; False elsewhere). Made by the agent
    before its server starts any thread: after a burst of calls (thousands rejected at once) the
    memory gRPC core's threads had taken from arenas of their own stayed resident after
    ``malloc_trim`` (docs/performance.md, "Memory over a long run"); in the main arena it goes back."""
    return _MALLOPT is not None and bool(_MALLOPT(M_ARENA_MAX, 1))


def _malloc_trim() -> Callable[[], None] | None:
    function = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    if function is None:
        return None  # not glibc
    return lambda: function(0)


_TRIM = _malloc_trim()


def trim() -> bool:
    """Give the free heap memory back to the kernel (glibc only; False elsewhere)."""
    if _TRIM is None:
        return False
    _TRIM()
    return True


class Trimmer:
    """``trim()`` once ``quiet`` seconds have passed since the last ``poke()`` (on the running loop)."""

    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self.trims = 0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def poke(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.quiet, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last + self.quiet - loop.time()
        if left > 0:
            self._timer = loop.call_later(left, self._check)
            return
        self._timer = None
        gc.collect()  # cyclic garbage (exceptions and their frames) first, so its memory goes too
        if trim():
            self.trims += 1

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the new soft limit.

    Every tunnelled connection holds a socket in ktrace and one in the agent, and the
    common default soft limit (1,024) ends a program's 1,000th connection with EMFILE in
    ktrace rather than in the program. ktrace calls this after forking the program, which
    keeps the user's limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


GC_THRESHOLD0 = 20_000


def tune_gc() -> None:
    """Freeze the start-up heap and collect generation 0 less often (see above). Called by
    ktrace and the agent once set up, just before their event loops start."""
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, threshold1, threshold2)
