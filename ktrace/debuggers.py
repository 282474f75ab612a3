"""Debuggers under ktrace (pure): which commands trace their program with ptrace, and which
backend a run of one needs.

A process has one ptrace slot. The ptrace backend holds the program's and follows its forks, so
a debugger run under it cannot start a program: the child's PTRACE_TRACEME fails with EPERM
("Operation not permitted"), reported in the debugger's own words after ktrace has started.
The notify backend leaves the slot free (docs/debugging.md). Recognising the command by name
is a guess, but the only moment ktrace can still choose is before the fork; a command that is
not recognised runs as asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

# Tools that start (or attach to) a program under ptrace: gdb and its server, LLVM's lldb,
# Go's dlv, the syscall and library-call tracers, and the rr recorder.
PTRACE_TOOLS: Final = frozenset(
    {"gdb", "gdb-multiarch", "gdbserver", "lldb", "lldb-server", "dlv", "strace", "ltrace", "rr"}
)
DOCS: Final = "docs/debugging.md"


def ptrace_tool(command: Sequence[str]) -> str | None:
    """The name of the ptrace-based tool ``command`` runs (None: not one ktrace knows)."""
    if not command:
        return None
    name = os.path.basename(command[0])
    return name if name in PTRACE_TOOLS else None


def requested_backend(
    requested: str, command: Sequence[str], notify_missing: str | None, *, ktrace_traced: bool = False
) -> str:
    """What to ask `backends.choose` for: under ``auto``, a debugger gets notify where this
    machine can run it (``notify_missing`` is None), since under ptrace it cannot trace at all;
    so does any program when ktrace itself runs under a tracer (`strace -f ktrace run ...`: the
    tracer follows ktrace's fork, and the program's ptrace slot is taken before ktrace's seize)."""
    if requested == "auto" and notify_missing is None and (ktrace_traced or ptrace_tool(command) is not None):
        return "notify"
    return requested


def ptrace_warning(command: Sequence[str], backend: str, notify_missing: str | None) -> str | None:
    """The one line to print before running ``command`` under ``backend``, or None: a debugger
    under the ptrace backend will fail with EPERM, and this says why and what to do instead."""
    tool = ptrace_tool(command)
    if tool is None or backend != "ptrace":
        return None
    line = f"warning: {tool} cannot trace a program it starts under the ptrace backend, which holds ptrace (EPERM)"
    if notify_missing is None:
        return f"{line} (hint: --backend notify leaves ptrace to {tool}; see {DOCS})"
    return f"{line} (hint: --backend notify would leave it free, but cannot run here: {notify_missing})"


def seize_failure_hint(tracer: str | None, notify_missing: str | None) -> str:
    """The hint when ktrace could not PTRACE_SEIZE the program; ``tracer`` names the process
    that traces it already (ktrace itself runs under `strace -f` or a debugger), if one does."""
    if tracer is None:
        return (
            "ptrace may be denied here (container seccomp profile, Yama ptrace_scope): --backend notify needs no "
            "ptrace; run `ktrace doctor`"
        )
    if notify_missing is None:
        return f"{tracer} traces the program already (ktrace runs under it): --backend notify needs no ptrace"
    return f"{tracer} traces the program already (ktrace runs under it), and --backend notify cannot run here"
