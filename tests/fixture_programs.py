"""Builds the fixture programs of tests/programs/ on demand, into a content-addressed cache.

A binary lives at ``~/.cache/ktrace/programs/<name>-<key>/<name>`` where ``key`` hashes the
sources, the build command and the compiler's version, so a warm run builds nothing and a
changed source or toolchain rebuilds. Binaries are never committed.

Tools the tests need that Debian does not ship at a usable version (dlv, the Go debugger) are
built the same way from a pinned Go module. Their modules are downloaded only by
``python tests/fixture_programs.py --download NAME`` (scripts/setup runs it); while tests run,
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
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
    source: str  # a .c file, a directory holding a Go module, or (module) PACKAGE@VERSION
    flags: tuple[str, ...] = ()
    static: bool = True  # C only: a dynamic binary is for LD_PRELOAD peers (proxychains)
    module: bool = False  # Go only: `go install` of a pinned package from the Go module proxy


SPECS: dict[str, Spec] = {
    "goclient": Spec("go", "goclient"),
    "goclient-stripped": Spec("go", "goclient", ("-ldflags=-s -w",)),
    "gobench": Spec("go", "gobench"),  # the Go client scripts/bench-kube times
    # client-go with rest.InClusterConfig(), as an operator is (tests/kube/test_kube_target_pod.py)
    "incluster": Spec("go", "incluster", ("-ldflags=-s -w",)),
    "cconnect": Spec("gcc", "cconnect.c"),
    "ckeepalive": Spec("gcc", "ckeepalive.c"),  # keepalive on an idle connection (test_e2e_keepalive.py)
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
    # the Go debugger, driven over its JSON-RPC API by tests/test_e2e_debuggers.py
    "dlv": Spec("go", "github.com/go-delve/delve/cmd/dlv@v1.27.2", module=True),
}


def _compiler_version(compiler: str) -> str:
    if shutil.which(compiler) is None:
        raise ProgramUnavailable(f"{compiler} is not installed (scripts/test installs it)")
    argv = [compiler, "version"] if compiler == "go" else [compiler, "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return out.stdout.splitlines()[0] if out.stdout else out.stderr


def _cache_proxy() -> str:
    """The Go module cache's download directory as a GOPROXY (file://): nothing leaves the machine."""
    out = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=False, timeout=60)
    return "file://" + os.path.join(out.stdout.strip(), "cache", "download")


def _inputs(spec: Spec) -> list[pathlib.Path]:
    if spec.module:
        return []  # the version in spec.source pins it, and the module proxy's checksums
    src = SOURCES / spec.source
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file())
    return [src, *sorted(SOURCES.glob("*.h"))]


class Programs:
    """``programs["cconnect"]`` → absolute path of the built binary (built once per key)."""

    def __init__(self, cache: pathlib.Path = CACHE, download: bool = False) -> None:
        self.cache = cache
        self.download = download  # may `go install` fetch a module spec's modules?
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
            if spec.module:
                # Outside any module (cwd), into work/ (GOBIN): the binary is named after the package.
                argv = ["go", "install", "-trimpath", *spec.flags, spec.source]
                env = {**os.environ, **GO_ENV, "GOBIN": str(work), "GOFLAGS": ""}
                # Offline, the module cache is the proxy (GOPROXY=off refuses even the lookup of
                # the module's deprecation notice that `go install PACKAGE@VERSION` makes).
                env["GOPROXY"] = os.environ.get("GOPROXY", "") if self.download else _cache_proxy()
                cwd = work
            elif spec.compiler == "go":
                argv = ["go", "build", "-trimpath", *spec.flags, "-o", str(out), "."]
                env = {**os.environ, **GO_ENV}
                cwd = SOURCES / spec.source
            else:
                link = ["-static"] if spec.static else []
                argv = [spec.compiler, *C_FLAGS, *link, *spec.flags, "-o", str(out), str(SOURCES / spec.source)]
                env, cwd = dict(os.environ), SOURCES
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600)
            if proc.returncode != 0 or not out.exists():
                fetch = " (`python tests/fixture_programs.py --download` fetches its modules)" if spec.module else ""
                raise BuildError(f"building {name} failed: {' '.join(argv)}{fetch}\n{proc.stdout}{proc.stderr}")
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


def main(argv: list[str]) -> int:
    """``python tests/fixture_programs.py [--download] NAME...``: build (and print) the programs."""
    download = "--download" in argv
    names = [arg for arg in argv if arg != "--download"]
    programs = Programs(download=download)
    for name in names:
        try:
            print(programs[name])
        except (ProgramUnavailable, BuildError) as exc:
            print(f"fixture_programs: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
