"""Pairs the program's DNS questions with their answers, and notices the ones never answered.

Pure (the clock is passed in). Fed with the raw datagrams ktrace relays for the
program: ``sent`` for each query, ``received`` for each response. A question is
identified by (program socket, server, message id, name, type): resolvers reuse
ids across sockets, and a retransmission of the same question is the same
question (the first send times it). A question unanswered for ``timeout`` seconds
is reported as "timeout", as the program's resolver is giving up around then
(glibc and Go wait 5 s per try). A response that does not parse answers the question it
names, or the one pending with its ID when it names none, as "malformed", with what was wrong:
the program got something at once, which no timeout describes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ktrace.report.events import DnsQuery
from ktrace.rules import RouteDecision
from ktrace.tunnel.dns_answers import Malformed, Question, malformed_response, parse_question, parse_response
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
        self._pending_names: Counter[str] = Counter()  # lower-case name -> questions pending

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
            self._pop(next(iter(self._pending)))
        self._pending[key] = _Pending(question, server, wall, now, self._route_of(question.name))
        self._pending_names[key[3]] += 1

    def _pop(self, key: _Key) -> _Pending | None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            left = self._pending_names[key[3]] - 1
            if left:
                self._pending_names[key[3]] = left
            else:
                del self._pending_names[key[3]]
        return pending

    def received(self, sock: int, server: Endpoint, payload: bytes, wall: float, now: float) -> DnsQuery | None:
        response = parse_response(payload)
        if response is None:
            malformed = malformed_response(payload)
            return self._malformed(sock, server, malformed, wall, now) if malformed is not None else None
        question = response.question
        pending = self._pop(self._key(sock, server, question))
        return self._event(question, server, pending, response.outcome, wall, now, response.addresses)

    def _malformed(self, sock: int, server: Endpoint, malformed: Malformed, wall: float, now: float) -> DnsQuery | None:
        question = malformed.question
        if question is not None:
            pending = self._pop(self._key(sock, server, question))
        else:
            key = next((k for k in self._pending if k[:3] == (sock, server, malformed.id)), None)
            if key is None:
                return None  # names no question, and answers none ktrace saw asked
            pending = self._pop(key)
            assert pending is not None
            question = pending.question
        return self._event(question, server, pending, malformed.outcome, wall, now, detail=malformed.problem)

    def _event(
        self,
        question: Question,
        server: Endpoint,
        pending: _Pending | None,
        outcome: str,
        wall: float,
        now: float,
        addresses: Iterable[object] = (),
        detail: str | None = None,
    ) -> DnsQuery:
        decision = pending.decision if pending is not None else self._route_of(question.name)
        return DnsQuery(
            time=pending.wall if pending is not None else wall,
            name=question.name,
            qtype=question.qtype,
            outcome=outcome,
            route=decision.route.value,
            server=str(server),
            addresses=tuple(str(ip) for ip in addresses),
            duration=now - pending.started if pending is not None else None,
            rule=decision.rule.describe() if decision.by_user_rule and decision.rule else None,
            detail=detail,
        )

    def pending(self, names: Iterable[str]) -> bool:
        """Whether a question for any of ``names`` (lower case) still waits for its answer."""
        return any(name in self._pending_names for name in names)

    def expire(self, now: float, everything: bool = False) -> list[DnsQuery]:
        """Questions unanswered for ``timeout``; with ``everything`` (at exit) also the younger
        ones, as "unanswered"."""
        gone: list[DnsQuery] = []
        for key, pending in list(self._pending.items()):
            late = now - pending.started >= self._timeout
            if everything or late:
                self._pop(key)
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
