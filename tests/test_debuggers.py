"""ktrace/debuggers.py: which commands are ptrace-based tools, and the backend they get (pure)."""

from __future__ import annotations

import pytest

from ktrace.debuggers import ptrace_tool, ptrace_warning, requested_backend, seize_failure_hint

MISSING = "Linux 5.10 is older than 5.14 (seccomp user notification with SECCOMP_ADDFD_FLAG_SEND)"


@pytest.mark.parametrize(
    ("command", "tool"),
    [
        (["gdb", "--args", "./svc"], "gdb"),
        (["/usr/bin/strace", "-f", "./svc"], "strace"),
        (["/home/me/go/bin/dlv", "exec", "./svc"], "dlv"),
        (["gdbserver", ":1234", "./svc"], "gdbserver"),
        (["./svc", "gdb"], None),  # only the command itself counts
        (["./gdb-helper"], None),
        (["python3", "-m", "pdb", "x.py"], None),  # pdb does not use ptrace
        ([], None),
    ],
)
def test_ptrace_tool(command: list[str], tool: str | None) -> None:
    assert ptrace_tool(command) == tool


def test_auto_gives_a_debugger_notify_where_it_runs() -> None:
    assert requested_backend("auto", ["gdb", "./svc"], None) == "notify"
    assert requested_backend("auto", ["gdb", "./svc"], MISSING) == "auto"  # backends.choose then says ptrace
    assert requested_backend("auto", ["./svc"], None) == "auto"


@pytest.mark.parametrize("asked", ["ptrace", "notify"])
def test_an_explicit_backend_is_kept(asked: str) -> None:
    assert requested_backend(asked, ["gdb", "./svc"], None) == asked


def test_warning_under_ptrace_points_to_notify_and_the_docs() -> None:
    line = ptrace_warning(["strace", "-f", "./svc"], "ptrace", None)
    assert line is not None
    assert line.startswith("warning: strace cannot trace a program it starts under the ptrace backend")
    assert "--backend notify" in line and "docs/debugging.md" in line
    assert "\n" not in line


def test_warning_says_why_notify_is_not_an_option_here() -> None:
    line = ptrace_warning(["gdb", "./svc"], "ptrace", MISSING)
    assert line is not None and MISSING in line


def test_no_warning_without_a_debugger_or_under_notify() -> None:
    assert ptrace_warning(["./svc"], "ptrace", None) is None
    assert ptrace_warning(["gdb", "./svc"], "notify", None) is None


def test_seize_failure_names_the_tracer_that_holds_ptrace() -> None:
    hint = seize_failure_hint("strace (pid 42)", None)
    assert hint.startswith("strace (pid 42) traces the program already") and "--backend notify" in hint
    assert "cannot run here" in seize_failure_hint("strace (pid 42)", MISSING)
    assert "ktrace doctor" in seize_failure_hint(None, None)  # no tracer: denied by a policy
