"""Run a program under an allow-everything seccomp filter (no tracer): what any seccomp-based tool
costs it at least. scripts/bench uses it as the floor of the syscall-overhead figures.

    python scripts/seccomp_floor.py PROGRAM [ARG...]
"""

from __future__ import annotations

import os
import sys

from ktrace.tracer import linux, seccomp

ALLOW_ALL = seccomp.Insn(seccomp.BPF_RET | seccomp.BPF_K, 0, 0, seccomp.RET_ALLOW).pack()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: seccomp_floor.py PROGRAM [ARG...]", file=sys.stderr)
        return 2
    linux.prepare_child_for_filter()
    linux.install_seccomp(ALLOW_ALL)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
