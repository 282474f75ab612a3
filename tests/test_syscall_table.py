"""The one syscall table: every stopping row has a handler, every handler a row, and the
filter and the dispatch are both made from it."""

from __future__ import annotations

import pytest

from ktrace.tracer import arch, seccomp, syscalls
from ktrace.tracer.dispatch import handlers
from ktrace.tracer.files import PATH_ARGUMENT

pytestmark = pytest.mark.timeout(30)


class _Anything:
    def __getattr__(self, name: str) -> object:
        return lambda *args: None


def test_every_stopping_row_has_a_handler_and_every_handler_a_row() -> None:
    table = handlers(_Anything(), _Anything())  # type: ignore[arg-type]
    rows = {row.handler for row in syscalls.TABLE if row.handler is not None}
    assert rows == set(table)
    for row in syscalls.TABLE:
        assert (row.handler is None) == isinstance(row.when, syscalls.Fails), row.name


def test_open_calls_know_where_their_path_is() -> None:
    assert {row.name for row in syscalls.TABLE if row.handler == "open"} == set(PATH_ARGUMENT)


@pytest.mark.parametrize("on", list(arch.ARCHES.values()), ids=lambda a: a.name)
def test_numbers_are_unique_per_arch_and_the_dispatch_knows_each(on: arch.Arch) -> None:
    numbers = [row.number(on) for row in syscalls.TABLE if row.number(on) is not None]
    assert len(numbers) == len(set(numbers))
    names = syscalls.names_by_number(on)
    for row in syscalls.TABLE:
        nr = row.number(on)
        if nr is not None and row.handler is not None:
            assert names[nr] == row.name


@pytest.mark.parametrize("on", list(arch.ARCHES.values()), ids=lambda a: a.name)
def test_the_filter_stops_every_stopping_row_and_only_those(on: arch.Arch) -> None:
    every_feature = frozenset(row.feature for row in syscalls.TABLE if row.feature is not None)
    program = seccomp.build(syscalls.filter_rules(every_feature, on=on), on=on)
    stopped = set()
    for nr in range(0, 600):
        # Arguments that satisfy every row's condition (clone's CLONE_UNTRACED bit, an address, a long
        # enough length, SOL_SOCKET/SO_ERROR).
        args = (3 | syscalls.CLONE_UNTRACED, 1, 4, 0x7FFF0000, 0x7FFF0000, 64)
        action = seccomp.evaluate(program, nr, on.audit_arch, args)
        if action & 0xFFFF0000 == seccomp.RET_TRACE:
            stopped.add(nr)
    expected = {row.number(on) for row in syscalls.TABLE if row.handler is not None and row.number(on) is not None}
    assert stopped == expected


def test_aarch64_has_no_open_and_x86_64_has() -> None:
    assert syscalls.number("open", arch.AARCH64) is None
    assert syscalls.number("open", arch.X86_64) == 2
    assert syscalls.number("mmap", arch.AARCH64) == 222


def test_the_tracer_imports_neither_grpc_nor_the_tunnel() -> None:
    """The tracer sees the agent only through tracer/ports.py: no module of it imports gRPC, the
    generated stubs or ktrace.tunnel (checked on the source, so a lazy import counts too)."""
    import ast
    import pathlib

    import ktrace.tracer

    root = pathlib.Path(ktrace.tracer.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("grpc", "ktrace_proto") or name.startswith("ktrace.tunnel"):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == []
