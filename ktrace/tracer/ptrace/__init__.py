"""The ptrace backend: the program is seized with PTRACE_SEIZE and every syscall the filter
sends to ktrace (SECCOMP_RET_TRACE) is a ptrace stop. It can rewrite a syscall's arguments
and see its result, so the kernel itself waits where the program waits (a blocking
connect parked at ktrace's loopback, `tcp/parking.py`): signals arrive at once. It holds the
program's one ptrace slot: no debugger can run under it (the notify backend leaves it free).
"""
