"""Pairs the program's DNS questions with their answers, and notices the ones never answered.

Pure (the clock is passed in). Fed with the raw datagrams ktrace relays for the
program: ``sent`` for each query, ``received`` for each response. A question is
identified by (program socket, server, message id, name, type): resolvers reuse
ids across sockets, and a retransmission of the same question is the same
question (the first send times it). A question unanswered for ``timeout`` seconds
is reported as "timeout", as the program's resolver is giving up around then
(glibc and Go wait 5 s per try).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ktrace.report.events import DnsQuery
from ktrace.rules import RouteDecision
from ktrace.tunnel.dns_answers import Question, parse_question, parse_response
from ktrace.tunnel.types import Endpoint

DNS_TIMEOUT = 5.0
MAX_PENDING = 4096

_Key = tuple[int, Endpoint, int, str, str]


@dataclass
class _Pending:
    question: Question
    server: Endpoint
    wall: float  # when sent (Unix time), for the event
    started: float  # monotonic
    decision: RouteDecision


class DnsTracker:
    def __init__(self, route_of: Callable[[str], RouteDecision], timeout: float = DNS_TIMEOUT) -> None:
        self._route_of = route_of
        self._timeout = timeout
        self._pending: dict[_Key, _Pending] = {}

    @staticmethod
    def _key(sock: int, server: Endpoint, question: Question) -> _Key:
        return sock, server, question.id, question.name.lower(), question.qtype

    def sent(self, sock: int, server: Endpoint, payload: bytes, wall: float, now: float) -> None:
        question = parse_question(payload)
        if question is None:
            return
        key = self._key(sock, server, question)
        if key in self._pending:
            return  # a retransmission
        if len(self._pending) >= MAX_PENDING:
            # A program flooding questions nobody answers must not grow ktrace: forget the oldest.
            del self._pending[next(iter(self._pending))]
        self._pending[key] = _Pending(question, server, wall, now, self._route_of(question.name))

    def received(self, sock: int, server: Endpoint, payload: bytes, wall: float, now: float) -> DnsQuery | None:
        response = parse_response(payload)
        if response is None:
            return None
        question = response.question
        pending = self._pending.pop(self._key(sock, server, question), None)
        decision = pending.decision if pending is not None else self._route_of(question.name)
        return DnsQuery(
            time=pending.wall if pending is not None else wall,
            name=question.name,
            qtype=question.qtype,
            outcome=response.outcome,
            route=decision.route.value,
            server=str(server),
            addresses=tuple(str(ip) for ip in response.addresses),
            duration=now - pending.started if pending is not None else None,
            rule=decision.rule.describe() if decision.by_user_rule and decision.rule else None,
        )

    def expire(self, now: float, everything: bool = False) -> list[DnsQuery]:
        """Questions unanswered for ``timeout``; with ``everything`` (at exit) also the younger
        ones, as "unanswered"."""
        gone: list[DnsQuery] = []
        for key, pending in list(self._pending.items()):
            late = now - pending.started >= self._timeout
            if everything or late:
                del self._pending[key]
                decision = pending.decision
                gone.append(
                    DnsQuery(
                        time=pending.wall,
                        name=pending.question.name,
                        qtype=pending.question.qtype,
                        # Cut short by the program's exit: not known to have failed.
                        outcome="timeout" if late else "unanswered",
                        route=decision.route.value,
                        server=str(pending.server),
                        rule=decision.rule.describe() if decision.by_user_rule and decision.rule else None,
                    )
                )
        return gone

    def __len__(self) -> int:
        return len(self._pending)
