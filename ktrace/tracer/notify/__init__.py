"""The seccomp user-notification backend: the filter answers the syscalls ktrace must see with
SECCOMP_RET_USER_NOTIF and ktrace, holding the listener, answers each from outside the program.
No ptrace: a debugger (gdb, dlv, strace) can trace the program. The call cannot be rewritten
or watched at its exit, so ktrace performs every call it decides on itself (on its duplicate
of the program's socket) and says what it returned; a call that must wait (a blocking
connect) waits in the kernel's notification wait, which signals interrupt. The program runs
under a guardian (`guardian.py`) so that it cannot outlive ktrace.
"""
