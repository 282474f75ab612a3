"""Run a command under a seccomp filter that makes ptrace(2) fail with EPERM, as a container's
seccomp profile can: `python deny_ptrace.py CMD [ARG...]`. A real filter, installed with
ktrace's own BPF builder; it is inherited by everything CMD starts."""

from __future__ import annotations

import errno
import os
import sys

from ktrace.tracer import linux, seccomp

PTRACE_X86_64 = 101


def main() -> None:
    linux.prepare_child_for_filter()  # NO_NEW_PRIVS: what lets an unprivileged process install it
    linux.install_seccomp(seccomp.build([seccomp.fail(PTRACE_X86_64, errno.EPERM)]))
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
