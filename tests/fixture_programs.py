"""Builds the fixture programs of tests/programs/ on demand, into a content-addressed cache.

A binary lives at ``~/.cache/ktrace/programs/<name>-<key>/<name>`` where ``key`` hashes the
sources, the build command and the compiler's version, so a warm run builds nothing and a
changed source or toolchain rebuilds. Binaries are never committed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass

SOURCES = pathlib.Path(__file__).resolve().parent / "programs"
CACHE = pathlib.Path(os.environ.get("KTRACE_PROGRAM_CACHE", "~/.cache/ktrace/programs")).expanduser()
C_FLAGS = ["-Wall", "-Wextra", "-Werror", "-O2"]
# GOPROXY=off: nothing is downloaded while tests run (incluster's modules are kube/build's, already cached).
GO_ENV = {"CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod", "GOPROXY": "off"}


class ProgramUnavailable(Exception):
    """The toolchain for a program is missing on this machine (tests skip)."""


class BuildError(Exception):
    """A program failed to build (tests fail)."""


@dataclass(frozen=True)
class Spec:
    compiler: str  # "go", "gcc" or "musl-gcc"
    source: str  # a .c file, or a directory holding a Go module
    flags: tuple[str, ...] = ()
    static: bool = True  # C only: a dynamic binary is for LD_PRELOAD peers (proxychains)


SPECS: dict[str, Spec] = {
    "goclient": Spec("go", "goclient"),
    "goclient-stripped": Spec("go", "goclient", ("-ldflags=-s -w",)),
    # client-go with rest.InClusterConfig(), as an operator is (tests/kube/test_kube_target_pod.py)
    "incluster": Spec("go", "incluster", ("-ldflags=-s -w",)),
    "cconnect": Spec("gcc", "cconnect.c"),
    "cthreads": Spec("gcc", "cthreads.c", ("-pthread",)),
    "cbulk": Spec("gcc", "cbulk.c"),
    "iouring": Spec("gcc", "iouring.c"),
    "cudp": Spec("gcc", "cudp.c"),
    "mresolve": Spec("musl-gcc", "mresolve.c"),
    "csignal": Spec("gcc", "csignal.c"),  # a blocking connect() a signal interrupts
    "crace": Spec("gcc", "crace.c", ("-pthread",)),  # a sockaddr changed while connect/send use it
    "cuntraced": Spec("gcc", "cuntraced.c"),  # a child made with clone(CLONE_UNTRACED)
    # scripts/bench: a syscall loop, the benchmark server, and a dynamic client
    "csysloop": Spec("gcc", "csysloop.c"),
    "cbenchsrv": Spec("gcc", "cbenchsrv.c", ("-pthread",)),
    "cnetbench": Spec("gcc", "cnetbench.c", static=False),
    "stopfloor": Spec("gcc", "stopfloor.c"),  # the least a stopped syscall costs, C supervisors
}


def _compiler_version(compiler: str) -> str:
    if shutil.which(compiler) is None:
        raise ProgramUnavailable(f"{compiler} is not installed (scripts/test installs it)")
    argv = [compiler, "version"] if compiler == "go" else [compiler, "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return out.stdout.splitlines()[0] if out.stdout else out.stderr


def _inputs(spec: Spec) -> list[pathlib.Path]:
    src = SOURCES / spec.source
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file())
    return [src, *sorted(SOURCES.glob("*.h"))]


class Programs:
    """``programs["cconnect"]`` → absolute path of the built binary (built once per key)."""

    def __init__(self, cache: pathlib.Path = CACHE) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._built: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def key(self, name: str) -> str:
        spec = SPECS[name]
        h = hashlib.sha256()
        h.update(repr((name, spec, _compiler_version(spec.compiler))).encode())
        for path in _inputs(spec):
            h.update(str(path.relative_to(SOURCES)).encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:20]

    def _build(self, name: str) -> str:
        spec = SPECS[name]
        final = self.cache / f"{name}-{self.key(name)}"
        binary = final / name
        if binary.exists():
            return str(binary)
        self.cache.mkdir(parents=True, exist_ok=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache))
        try:
            out = work / name
            if spec.compiler == "go":
                argv = ["go", "build", "-trimpath", *spec.flags, "-o", str(out), "."]
                env = {**os.environ, **GO_ENV}
                cwd = SOURCES / spec.source
            else:
                link = ["-static"] if spec.static else []
                argv = [spec.compiler, *C_FLAGS, *link, *spec.flags, "-o", str(out), str(SOURCES / spec.source)]
                env, cwd = dict(os.environ), SOURCES
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
            if proc.returncode != 0 or not out.exists():
                raise BuildError(f"building {name} failed: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
            try:
                work.rename(final)
            except OSError:  # another run built the same key meanwhile
                if not binary.exists():
                    raise
            return str(binary)
        finally:
            shutil.rmtree(work, ignore_errors=True)


class SkippingPrograms(Programs):
    """For pytest: a missing toolchain skips the test that asked for the program."""

    def __getitem__(self, name: str) -> str:
        import pytest

        try:
            return super().__getitem__(name)
        except ProgramUnavailable as exc:
            pytest.skip(str(exc))
