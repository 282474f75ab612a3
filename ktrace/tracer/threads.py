"""Which process (thread group) a traced thread belongs to.

Stops are reported per thread; files, sockets and address spaces belong to the
process. The answer is read from /proc once per thread and kept until the thread
exits or execs (exec from a non-leader thread gives it the leader's id), so hot
paths such as a UDP connect never read /proc twice for the same thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ktrace.tracer import linux
from ktrace.tracer.tracee import TraceeGone


@dataclass
class ThreadGroups:
    # False under the notify backend, which sees no thread exit or exec: a thread id could be
    # reused by another process after an answer was kept.
    cache: bool = True
    _known: dict[int, int] = field(default_factory=dict)

    def of(self, tid: int) -> int:
        """The process id of thread ``tid``; raises ``TraceeGone`` if it no longer exists."""
        known = self._known.get(tid)
        if known is None:
            known = linux.thread_group_of(tid)
            if self.cache:
                self._known[tid] = known
        return known

    def of_or_self(self, tid: int) -> int:
        """As ``of``, but a thread already gone is named by its own id (for reports)."""
        try:
            return self.of(tid)
        except TraceeGone:
            return tid

    def forget(self, tid: int) -> None:
        self._known.pop(tid, None)
