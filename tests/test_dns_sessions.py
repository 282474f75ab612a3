"""Handing a quiet DNS session from one program socket to the next (pure bookkeeping)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ktrace.tunnel.dns_sessions import SessionHandover

V4, V6 = socket.AF_INET, socket.AF_INET6


@dataclass(eq=False)
class Session:
    usable: bool = True


def question(ident: int) -> bytes:
    return ident.to_bytes(2, "big") + b"\x01\x00\x00\x01"


answer = question  # only the ID matters here


def asked_and_answered(handover: SessionHandover[Session], key: int, session: Session, *idents: int) -> None:
    for ident in idents:
        handover.sent(key, V4, 53, question(ident))
    for ident in idents:
        assert handover.received(key, 53, answer(ident), session)


def test_a_quiet_session_goes_to_the_next_socket_that_asks() -> None:
    handover: SessionHandover[Session] = SessionHandover()
    first = Session()
    assert handover.take(1, V4) is None  # nothing quiet yet: a new session
    asked_and_answered(handover, 1, first, 0x1111, 0x2222)  # A and AAAA
    assert handover.take(2, V6) is None  # another family
    assert handover.take(2, V4) == (1, first)
    assert handover.take(3, V4) is None  # taken once


def test_not_quiet_while_a_question_waits_or_after_other_traffic() -> None:
    handover: SessionHandover[Session] = SessionHandover()
    waiting, other, closed = Session(), Session(), Session(usable=False)
    handover.sent(1, V4, 53, question(1))
    handover.sent(1, V4, 53, question(2))
    assert handover.received(1, 53, answer(1), waiting)
    assert handover.take(9, V4) is None  # question 2 is still waiting
    handover.sent(2, V4, 123, b"ntp?")  # not DNS
    handover.sent(2, V4, 53, question(3))
    handover.received(2, 53, answer(3), other)
    asked_and_answered(handover, 3, closed, 4)
    assert handover.take(9, V4) is None
    assert handover.received(1, 53, answer(2), waiting)
    assert handover.take(1, V4) is None  # never to itself
    assert handover.take(9, V4) is None  # ... and it is no longer offered once passed over


def test_asking_again_or_closing_withdraws_the_offer() -> None:
    handover: SessionHandover[Session] = SessionHandover()
    again, gone = Session(), Session()
    asked_and_answered(handover, 1, again, 1)
    asked_and_answered(handover, 2, gone, 2)
    handover.sent(1, V4, 53, question(3))  # socket 1 asks again on its own session
    handover.forget(2)  # socket 2 closed
    assert handover.take(9, V4) is None
    assert len(handover) == 1


def test_late_duplicates_for_the_previous_socket_are_dropped() -> None:
    handover: SessionHandover[Session] = SessionHandover()
    session = Session()
    asked_and_answered(handover, 1, session, 0xAAAA, 0xBBBB)
    assert handover.take(2, V4) == (1, session)
    handover.sent(2, V4, 53, question(0xBBBB))  # the new socket happens to use an old ID
    assert not handover.received(2, 53, answer(0xAAAA), session)  # socket 1's answer, again
    assert handover.received(2, 53, answer(0xBBBB), session)  # socket 2's own question
    assert handover.received(2, 53, answer(0xCCCC), session)  # anything else still arrives
    assert handover.received(2, 99, answer(0xAAAA), session)  # not from a nameserver: not DNS
