"""Agent sessions handed from one program socket to the next one that asks a nameserver.

glibc opens a UDP socket for every lookup and closes it once its questions are answered;
each program socket gets an agent session (a ``Datagrams`` stream and a UDP socket in the
agent), and starting one, then ending it once a sweep finds the program socket closed,
costs ~0.4 ms of CPU in ktrace and ~0.7 ms in the agent per lookup (docs/performance.md).
ktrace does not see close(). Instead of a new session for a new socket's first question
to port 53, it takes over the session of a socket that is *quiet*: everything it sent
went to port 53 and every question (by DNS message ID) has had its answer.

What the program sees does not change: each program socket has one session at a time
and every answer goes to the socket whose question it answers. A socket whose session
was taken gets a new one if it asks again. A late duplicate of an answer the session's
previous socket already had is dropped, as the kernel would drop it at that (closed)
socket. What changes is seen only by the nameserver: successive lookups come from one
source port, as from a resolver that keeps its socket.

Pure bookkeeping (no I/O); ``UdpRelays`` calls it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

DNS_PORT = 53
REMEMBERED_ANSWERS = 16  # message IDs answered to a socket, kept to recognise late duplicates


class _Session(Protocol):
    @property
    def usable(self) -> bool: ...


S = TypeVar("S", bound=_Session)


def message_id(payload: bytes) -> bytes:
    return payload[:2]


@dataclass
class _Use:
    """What one program socket did with its session."""

    family: int
    asked: Counter[bytes] = field(default_factory=Counter)  # IDs of questions not answered yet
    answered: list[bytes] = field(default_factory=list)  # IDs answered (the last few)
    stale: frozenset[bytes] = frozenset()  # IDs answered to the session's previous socket
    dns_only: bool = True  # everything sent went to port 53

    @property
    def quiet(self) -> bool:
        return self.dns_only and not self.asked


class SessionHandover(Generic[S]):
    def __init__(self) -> None:
        self._uses: dict[int, _Use] = {}
        # Quiet sockets and their sessions, per session family, most recently quiet last.
        self._quiet: dict[int, OrderedDict[int, S]] = {}

    def sent(self, key: int, family: int, port: int, payload: bytes) -> None:
        """Socket ``key`` (its session of ``family``) sent ``payload`` to ``port``."""
        use = self._uses.get(key)
        if use is None:
            use = self._uses[key] = _Use(family)
        self._unquiet(key, use)
        if port == DNS_PORT and len(payload) >= 2:
            use.asked[message_id(payload)] += 1
        else:
            use.dns_only = False

    def received(self, key: int, port: int, payload: bytes, session: S) -> bool:
        """``payload`` came from ``port`` on socket ``key``'s ``session``: False when it is a
        late duplicate of an answer the session's previous socket had (drop it)."""
        use = self._uses.get(key)
        if use is None:
            return True
        if port != DNS_PORT or len(payload) < 2:
            return True
        ident = message_id(payload)
        if use.asked[ident] > 0:
            use.asked[ident] -= 1
            if not use.asked[ident]:
                del use.asked[ident]
            use.answered.append(ident)
            del use.answered[:-REMEMBERED_ANSWERS]
        elif ident in use.stale:
            return False
        if use.quiet and session.usable:
            self._quiet.setdefault(use.family, OrderedDict())[key] = session
        return True

    def take(self, key: int, family: int) -> tuple[int, S] | None:
        """A quiet session of ``family`` for socket ``key``'s first question, and the socket
        it was taken from (which must forget it); None: start a new one."""
        quiet = self._quiet.get(family)
        while quiet:
            owner, session = quiet.popitem(last=True)
            if owner == key or not session.usable:
                continue
            previous = self._uses.pop(owner, None)  # if it asks again, it starts afresh
            stale = frozenset(previous.answered) if previous is not None else frozenset()
            self._uses[key] = _Use(family, stale=stale)
            return owner, session
        return None

    def forget(self, key: int) -> None:
        """Socket ``key`` is closed, or its session ended."""
        use = self._uses.pop(key, None)
        if use is not None:
            self._unquiet(key, use)

    def _unquiet(self, key: int, use: _Use) -> None:
        quiet = self._quiet.get(use.family)
        if quiet is not None:
            quiet.pop(key, None)

    def __len__(self) -> int:
        """Sockets tracked (tests, diagnostics)."""
        return len(self._uses)
